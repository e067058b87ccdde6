"""Engine options (vLLM's names where vLLM has one) and the resolved model facts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_POLICIES = ("fcfs", "priority")
_WEIGHT_MODES = ("auto", "dequantize", "quantized")


@dataclass(slots=True)
class EngineConfig:
    """Everything a user can set when building an engine.

    ``None`` means "let the platform / model decide"; :meth:`Platform.configure`
    fills platform defaults, the model loader fills model defaults.
    """

    model: str | None = None
    tokenizer: str | None = None
    device: str | None = None  # platform name; None = auto-detect (or $KVIK_DEVICE)
    dtype: str = "auto"
    max_model_len: int | str | None = None  # int, None (from the model) or "auto" (fit memory)
    block_size: int | None = None
    kv_cache_memory: int | None = None  # bytes for KV blocks; overrides the utilisation rule
    gpu_memory_utilization: float = 0.9  # fraction of the device's total memory kvik may use
    num_kv_blocks: int | None = None  # exact pool size (tests, benchmarks)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    scheduling_policy: str = "fcfs"
    attention_backend: str | None = None
    quantization: str | None = None
    quantized_weights: str = "auto"  # keep quantized weights packed, or dequantize at load
    enforce_eager: bool = False  # no CUDA graphs / compiled graphs
    # Schedule step n+1 while the device runs step n (None: the platform decides; on for CUDA/ROCm).
    async_scheduling: bool | None = None
    seed: int = 0
    num_threads: int | None = None  # CPU platforms: torch intra-op threads
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # platform- or plugin-specific options

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.scheduling_policy not in _POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(_POLICIES)}, got {self.scheduling_policy!r}"
            )
        if self.quantized_weights not in _WEIGHT_MODES:
            raise ValueError(
                f"quantized_weights must be one of {', '.join(_WEIGHT_MODES)}, got {self.quantized_weights!r}"
            )
        if isinstance(self.max_model_len, str) and self.max_model_len != "auto":
            raise ValueError(f"max_model_len must be an integer, None or 'auto', got {self.max_model_len!r}")
        for name in ("max_model_len", "block_size", "max_num_batched_tokens", "max_num_seqs",
                     "kv_cache_memory", "num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from keyword arguments; unknown names are an error listing the known ones.

        vLLM options kvik lacks are accepted at their "off" value (``kvik.vllm_options``)."""
        from kvik.vllm_options import strip_off_options

        kwargs = strip_off_options(kwargs)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)


@dataclass(slots=True)
class ModelConfig:
    """Facts about the loaded model that the engine and runners need."""

    architecture: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: str  # resolved: float32 / float16 / bfloat16
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    max_model_len: int
    sliding_window: int | None = None
    eos_token_ids: frozenset[int] = frozenset()
    quantization: str | None = None  # registered quantization method name
    source: Any = None  # the ModelFormat / path that produced this model
