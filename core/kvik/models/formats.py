"""Checkpoint formats: how a path on disk becomes a config, weights and a tokenizer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar


class ModelFormat(ABC):
    """A checkpoint layout kvik can load (safetensors directory, GGUF file, ...)."""

    name: ClassVar[str]
    # Whether transformers may run code shipped with the checkpoint (custom config or tokenizer
    # classes) when this format reads them; set from EngineConfig.trust_remote_code.
    trust_remote_code: bool = False

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    @abstractmethod
    def matches(cls, path: str) -> bool:
        """Whether ``path`` is in this format (cheap: look at names and magic bytes)."""

    @abstractmethod
    def load_hf_config(self) -> Any:
        """A ``transformers.PretrainedConfig`` describing the model."""

    @abstractmethod
    def iter_weights(self, quantized: bool) -> Iterator[tuple[str, Any]]:
        """Yield ``(hf_parameter_name, value)``.

        With ``quantized`` False every value is a dense tensor; with True,
        linear weights may be whatever :meth:`quantization` 's method loads, and
        a dense parameter may come as an object with ``shape`` and
        ``dequantize_into(param)``, which decodes itself into the parameter
        (GGUF's quantized token embedding: no float32 copy of it is held).
        """

    @abstractmethod
    def load_tokenizer(self) -> Any:
        """A ``transformers`` tokenizer (with its chat template, if any)."""

    def quantization(self) -> tuple[str, dict[str, Any]] | None:
        """The quantization method name and its config, or None for dense weights."""
        return None

    def weight_bytes(self) -> int:
        """Bytes of weights on disk (for progress reporting and planning)."""
        return 0
