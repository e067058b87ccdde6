"""The interface every hardware platform plugin implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from kvik.config import EngineConfig, ModelConfig
    from kvik.worker.interface import ModelRunner


@dataclass(slots=True)
class MemoryInfo:
    """Device memory in bytes, as the platform sees it now."""

    total: int
    free: int


class Platform(ABC):
    """A kind of hardware kvik can run on.

    Subclasses set the class attributes and implement the abstract methods.
    ``is_available`` must be cheap and must not initialise a device runtime:
    ``kvik plugins`` calls it for every platform.
    """

    name: ClassVar[str]  # what users pass to device= / --device
    aliases: ClassVar[tuple[str, ...]] = ()
    device_type: ClassVar[str]  # torch device string ("cpu", "cuda") or "mlx"
    priority: ClassVar[int] = 0  # auto-selection picks the highest available
    # Backend names in order of preference; the first valid one is used.
    attention_backends: ClassVar[tuple[str, ...]] = ("torch_ref",)
    # Quantization methods this platform runs; None = any registered one.
    quantization_methods: ClassVar[tuple[str, ...] | None] = None
    supported_dtypes: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
    default_block_size: ClassVar[int] = 16

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this machine can run the platform. Cheap, never raises."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why ``is_available()`` is False (shown to users who force the platform)."""
        return None

    def default_dtype(self, model_dtype: str) -> str:
        """The compute dtype for ``dtype='auto'`` given the checkpoint's dtype."""
        return model_dtype if model_dtype in self.supported_dtypes else "float32"

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and free memory the engine may plan against, in bytes."""

    def configure(self, config: EngineConfig) -> list[str]:
        """Fill platform defaults into ``config`` (only fields left as None).

        Return notes on what was set; raise ``ValueError`` with advice when the
        configuration cannot run here.
        """
        notes: list[str] = []
        if config.block_size is None:
            config.block_size = self.default_block_size
        if config.max_num_seqs is None:
            config.max_num_seqs = 256
        if config.max_num_batched_tokens is None:
            config.max_num_batched_tokens = 2048
        return notes

    def quantized_weights_mode(self, config: EngineConfig, method: str) -> str:
        """'dequantize' (to the compute dtype at load) or 'quantized' (packed in memory)."""
        if config.quantized_weights != "auto":
            return config.quantized_weights
        return "dequantize"

    @abstractmethod
    def create_model_runner(self, config: EngineConfig, model_config: ModelConfig) -> ModelRunner:
        """Build (not yet load) the model runner that executes steps on this platform."""

    def describe(self) -> dict[str, str]:
        """Key facts for ``kvik env`` (device name, runtime versions, ...)."""
        return {"platform": self.name, "device_type": self.device_type}
