"""The interface every hardware platform plugin implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from kvik.config import PlatformOptions, WeightsMode

if TYPE_CHECKING:
    from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
    from kvik.distributed.parallel_state import AllReduce
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

    Configuration happens in one step (:func:`kvik.engine.config_resolution.resolve_config`):
    options the user left unset take :meth:`engine_defaults` (the ``default_*``
    class data unless a subclass extends it), the platform's own options are
    built by :meth:`resolve_options`, and the frozen result goes through
    :meth:`configure` once, which may refuse it or apply process-wide settings.
    Never mutate the user's ``EngineConfig``.
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
    # Defaults for the engine options a user may leave unset (one home each).
    default_block_size: ClassVar[int] = 16
    default_max_num_seqs: ClassVar[int] = 256
    default_max_num_batched_tokens: ClassVar[int] = 2048
    default_async_scheduling: ClassVar[bool] = False  # only runners that overlap with a device gain from it
    # The platform's typed options: a frozen dataclass set through EngineConfig.platform_options.
    options_type: ClassVar[type[PlatformOptions]] = PlatformOptions
    # The torch.distributed backend its ranks talk over ("gloo", "nccl"); None: the platform runs one
    # device per engine (tensor_parallel_size / pipeline_parallel_size > 1 are refused).
    distributed_backend: ClassVar[str | None] = None

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this machine can run the platform. Cheap, never raises."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why ``is_available()`` is False (shown to users who force the platform)."""
        return None

    def default_dtype(self, model_dtype: str, quantization: str | None = None) -> str:
        """The compute dtype for ``dtype='auto'`` given the checkpoint's dtype and its quantization method
        (``"gguf"``, ...; None for a dense checkpoint)."""
        return model_dtype if model_dtype in self.supported_dtypes else "float32"

    @abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Total and free memory the engine may plan against, in bytes."""

    def engine_defaults(self, config: EngineConfig, model_config: ModelConfig) -> dict[str, Any]:
        """Values for the ``EngineConfig`` fields the user left as ``None``, by field name.

        The base returns the ``default_*`` class data; a subclass extends the dict
        (call ``super()``) for defaults that depend on the machine or the model,
        e.g. a KV-cache budget from the RAM available now. Only unset fields take
        these values; a returned name that is not a field is an error.
        """
        return {
            "block_size": self.default_block_size,
            "max_num_seqs": self.default_max_num_seqs,
            "max_num_batched_tokens": self.default_max_num_batched_tokens,
            "async_scheduling": self.default_async_scheduling,
        }

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> PlatformOptions:
        """Build :attr:`options_type` from the user's ``platform_options`` (names already checked).

        The base passes them through, so fields take their dataclass defaults;
        a subclass fills machine-dependent ones. Raise ``ValueError`` with advice
        for a value that cannot work.
        """
        return self.options_type(**options)

    def option_names(self) -> list[str]:
        """The names users may put in ``platform_options`` for this platform."""
        return [f.name for f in fields(self.options_type)]

    def configure(self, config: ResolvedConfig, model_config: ModelConfig) -> list[str]:
        """Check the resolved configuration on this platform and apply process-wide settings.

        Called once per engine, before the model runner is built. Return notes
        for the start-up log; raise ``ValueError`` with advice when the
        configuration cannot run here. The base accepts everything.
        """
        return []

    def quantized_weights_mode(self, config: EngineConfig, method: str) -> WeightsMode:
        """How ``method``-quantized weights are held when the user left ``quantized_weights='auto'``."""
        return WeightsMode.DEQUANTIZE

    def device_count(self) -> int | None:
        """Devices of this kind one host offers (the most ranks an engine may use here); None: no limit
        (CPU ranks are processes). Called only when more than one rank is asked for."""
        return None

    def bind_rank(self, local_rank: int) -> None:  # noqa: B027 - optional: platforms with one shared device keep the no-op
        """In a worker process, before its runner is built: make device ``local_rank`` this process's."""

    def tensor_parallel_all_reduce(self, group: Any, dtype: str) -> AllReduce | None:
        """In a worker process, once its tensor-parallel ``group`` exists (its device bound): a faster sum
        over the group of ``dtype`` activations (the model's compute dtype) than
        ``torch.distributed.all_reduce`` for the inputs it takes, or None (the default:
        every sum goes through torch.distributed). Contract: the callable returns the sum over the group
        as a new tensor (its input left as it was), or None for an input it does not take (that one then
        goes through torch.distributed); every rank makes the same choice for the same shape and dtype; it
        may run inside the platform's graph capture; its result is bit-identical on every rank."""
        return None

    @abstractmethod
    def create_model_runner(self, config: ResolvedConfig, model_config: ModelConfig) -> ModelRunner:
        """Build (not yet load) the model runner that executes steps on this platform."""

    def describe(self) -> dict[str, str]:
        """Key facts for ``kvik env`` (device name, runtime versions, ...)."""
        return {"platform": self.name, "device_type": self.device_type}
