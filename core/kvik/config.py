"""Engine options: what the user asks for (:class:`EngineConfig`) and what the engine runs with
(:class:`ResolvedConfig`), plus the resolved model facts (:class:`ModelConfig`).

The user's ``EngineConfig`` leaves ``None`` where the platform or the model
decides. :func:`kvik.engine.config_resolution.resolve_config` turns it, the
platform's defaults and the plugins' ``kvik_configure`` adjustments into one
frozen ``ResolvedConfig`` of plain values that the scheduler, the runners and
the server read; nothing downstream fills a default again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from kvik.spec_decode.config import SpeculativeConfig

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_POLICIES = ("fcfs", "priority")
_WEIGHT_MODES = ("auto", "dequantize", "quantized")
_MODEL_IMPLS = ("auto", "kvik", "transformers")
# kv_cache_dtype values (vLLM's names): "auto" = the model dtype; "fp8" is an alias of "fp8_e4m3".
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(value: object) -> str:
    """The canonical cache dtype name ("auto" or "fp8_e4m3") for a user's ``kv_cache_dtype``.

    ValueError, with what works, for anything else (vLLM's other FP8 flavours included).
    """
    if value == "auto":
        return "auto"
    if value in ("fp8", "fp8_e4m3"):
        return "fp8_e4m3"
    hint = ""
    if isinstance(value, str) and value.startswith("fp8"):
        hint = " (kvik's FP8 KV cache is e4m3 only)"
    raise ValueError(
        f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {value!r}{hint}: "
        "'auto' keeps K/V in the model dtype, 'fp8' (= 'fp8_e4m3') stores them as float8 e4m3 with "
        "per-layer scales, holding twice the tokens of a 16-bit cache"
    )


class SchedulingPolicy(str, Enum):
    """Which waiting request the scheduler admits first."""

    FCFS = "fcfs"
    PRIORITY = "priority"


class LoadFormat(str, Enum):
    """Where the weights come from."""

    AUTO = "auto"  # the checkpoint's format (safetensors, GGUF, ...)
    DUMMY = "dummy"  # seeded random weights of the right shapes: nothing is read (benchmarks)


class WeightsMode(str, Enum):
    """How a quantized checkpoint's linear weights are held in memory."""

    DEQUANTIZE = "dequantize"  # converted to the compute dtype at load
    QUANTIZED = "quantized"  # kept packed; the quantization method's kernels run them


@dataclass(frozen=True, slots=True)
class PlatformOptions:
    """Base of a platform's typed options (``Platform.options_type``); the base has none.

    A platform subclasses this as a frozen dataclass whose fields users set
    through ``EngineConfig.platform_options``; every field needs a default or
    the platform's :meth:`~kvik.platforms.Platform.resolve_options` must fill it.
    """


@dataclass(slots=True)
class EngineConfig:
    """Everything a user can set when building an engine (vLLM's names where vLLM has one).

    ``None`` means "let the platform or the model decide". Defaults that do not
    depend on the platform live here, as field defaults; the platform's live on
    the :class:`~kvik.platforms.Platform` class.
    """

    model: str | None = None  # a checkpoint path or a Hugging Face Hub id ("org/name")
    tokenizer: str | None = None  # path or Hub id; None: the model's own
    revision: str | None = None  # Hub branch, tag or commit of the model (and of a Hub tokenizer)
    download_dir: str | None = None  # Hub cache folder; None: huggingface_hub's (HF_HOME / HF_HUB_CACHE)
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
    # With chunked prefill: at most this many tokens of one request per step (0 = no limit).
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    attention_backend: str | None = None
    quantization: str | None = None
    quantized_weights: str = "auto"  # keep quantized weights packed, or dequantize at load
    # What the paged KV cache stores: "auto" (the model dtype) or "fp8" / "fp8_e4m3" (float8 e4m3
    # with one K and one V scale per layer, from the checkpoint or 1.0; docs/quantization.md).
    kv_cache_dtype: str = "auto"
    # FP8 cache only: layers the checkpoint gives no k_scale/v_scale get scales measured on a
    # calibration prefill at start-up instead of 1.0 (vLLM's option name).
    calculate_kv_scales: bool = False
    load_format: str = "auto"  # "dummy": random weights, only the checkpoint's config (and tokenizer) is read
    # Which modelling code runs the architecture (vLLM's name): "auto" = kvik's native one when
    # registered, else transformers' (the fallback); "kvik" = native or an error; "transformers" =
    # always transformers' code with kvik's paged attention (for comparing, or a native bug).
    model_impl: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs / compiled graphs
    # Tensor parallelism: always sum through torch.distributed (NCCL), never the platform's faster small-message
    # all-reduce (CUDA: symmetric memory over NVLink); vLLM's option name.
    disable_custom_all_reduce: bool = False
    # Schedule step n+1 while the device runs step n (None: the platform decides; on for CUDA/ROCm).
    async_scheduling: bool | None = None
    seed: int = 0
    # "generate" (sampling), "pooling" (embeddings, classification, scores: kvik.pooling) or
    # "auto": pooling for pooling architectures (*Model, *ForSequenceClassification), else generate.
    runner: str = "auto"
    # Host compute threads: a platform option under a top-level name (the cpu platform's torch
    # intra-op threads); platforms without a ``num_threads`` option ignore it, with a note.
    num_threads: int | None = None
    # Let transformers run code shipped with the checkpoint when it reads its config and tokenizer.
    trust_remote_code: bool = False
    # The selected platform's typed options by name (see ``kvik env`` / the platform's docs),
    # e.g. {"fused_layers": False} on cuda, {"cpu_affinity": "0-3"} on cpu.
    platform_options: dict[str, Any] = field(default_factory=dict)
    # Speculative decoding, vLLM's shape: {"method": "ngram", "num_speculative_tokens": 4, ...}
    # (see kvik.spec_decode.config.SpeculativeConfig); None: off.
    speculative_config: dict[str, Any] | SpeculativeConfig | None = None
    # Multi-LoRA serving (kvik.lora, docs/lora.md; vLLM's names): requests may name a PEFT adapter.
    enable_lora: bool = False
    max_loras: int = 1  # adapters in one step: the device slots
    max_lora_rank: int = 16  # the largest adapter rank accepted (slots are sized for it)
    max_cpu_loras: int | None = None  # adapters kept in host memory; None: max_loras
    # More than one device (docs/distributed.md): the model's layers split over tensor_parallel_size
    # ranks, its layers over pipeline_parallel_size stages; tp x pp worker processes in all.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Who runs the ranks: "uni" (this process; one rank), "mp" (worker processes on this host),
    # "ray" (Ray actors, any host of the cluster), or a name a plugin registered. None: "uni" for
    # one rank, else "mp".
    distributed_executor_backend: str | None = None
    # Which replica of a data-parallel server this engine is (kvik.engine.data_parallel): its ranks use
    # devices [rank * tp * pp, (rank + 1) * tp * pp) of this host.
    data_parallel_rank: int = 0
    # Batch-invariant numerics (docs/configuration.md#deterministic-mode): a request's logits and
    # tokens are bit-identical whether it runs alone or in any batch, at any position, chunked or not.
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)  # ValueError naming the bad key
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
        if resolve_kv_cache_dtype(self.kv_cache_dtype) == "auto" and self.calculate_kv_scales:
            raise ValueError(
                "calculate_kv_scales=True measures FP8 KV-cache scales, but kv_cache_dtype is 'auto' (the model "
                "dtype, no scales): pass kv_cache_dtype='fp8' too, or drop calculate_kv_scales"
            )
        if self.load_format in ("safetensors", "gguf"):  # vLLM's spellings of "read the checkpoint"
            self.load_format = LoadFormat.AUTO.value
        if self.load_format not in tuple(f.value for f in LoadFormat):
            raise ValueError(
                f"load_format must be one of {', '.join(f.value for f in LoadFormat)}, got {self.load_format!r}"
            )
        if self.model_impl not in _MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(_MODEL_IMPLS)}, got {self.model_impl!r}")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValueError(f"runner must be 'auto', 'generate' or 'pooling', got {self.runner!r}")
        if isinstance(self.max_model_len, str) and self.max_model_len != "auto":
            raise ValueError(f"max_model_len must be an integer, None or 'auto', got {self.max_model_len!r}")
        for name in ("max_model_len", "block_size", "max_num_batched_tokens", "max_num_seqs",
                     "kv_cache_memory", "num_kv_blocks", "num_threads", "tensor_parallel_size",
                     "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.data_parallel_rank, bool) or not isinstance(self.data_parallel_rank, int) or self.data_parallel_rank < 0:
            raise ValueError(f"data_parallel_rank must be an integer >= 0, got {self.data_parallel_rank!r}")
        if isinstance(self.long_prefill_token_threshold, bool) or self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be an int >= 0 (0 = no limit), got {self.long_prefill_token_threshold!r}"
            )
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise ValueError(f"max_loras must be an integer >= 1, got {self.max_loras!r}")
        if isinstance(self.max_lora_rank, bool) or not isinstance(self.max_lora_rank, int) or not 1 <= self.max_lora_rank <= 256:
            raise ValueError(f"max_lora_rank must be an integer in [1, 256], got {self.max_lora_rank!r}")
        if self.max_cpu_loras is not None and (isinstance(self.max_cpu_loras, bool) or self.max_cpu_loras < self.max_loras):
            raise ValueError(
                f"max_cpu_loras must be >= max_loras ({self.max_loras}) (the host cache feeds the slots), "
                f"got {self.max_cpu_loras!r}"
            )
        for name in ("deterministic", "enforce_eager", "disable_custom_all_reduce", "calculate_kv_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.platform_options, dict):
            raise ValueError(f"platform_options must be a dict of option name -> value, got {self.platform_options!r}")
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


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """The configuration the engine runs with: every option decided, nothing left to default.

    Built once per engine by :func:`kvik.engine.config_resolution.resolve_config`
    from the user's :class:`EngineConfig`, the platform's defaults and the
    plugins' adjustments; read by the scheduler, the model runner and the server.
    The model's own facts (compute dtype, context length, ...) are in
    :class:`ModelConfig`.
    """

    model: str  # local checkpoint path (a Hub id is downloaded or found in the cache first)
    model_name: str  # the model as the user named it (Hub id or path): the default served name
    tokenizer: str  # local tokenizer path: the checkpoint's own when the user named none
    trust_remote_code: bool
    platform: str  # the selected platform's name
    block_size: int  # tokens per KV block
    max_num_seqs: int  # requests per step
    max_num_batched_tokens: int  # tokens per step (>= max_model_len without chunked prefill)
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    long_prefill_token_threshold: int  # tokens of one request per step; 0 = no limit
    scheduling_policy: SchedulingPolicy
    # KV-cache size, first match wins: an exact block count, a byte budget, or the share of
    # device memory (``gpu_memory_utilization``) left after weights and activations.
    num_kv_blocks: int  # 0 = not fixed
    kv_cache_memory: int  # bytes; 0 = not fixed
    gpu_memory_utilization: float
    fit_max_model_len: bool  # max_model_len="auto": lower it to what the KV cache holds
    quantized_weights: WeightsMode
    load_format: LoadFormat
    attention_backend: str  # the backend's registry name: the user's, else the platform's first that fits
    enforce_eager: bool  # no CUDA graphs / compiled graphs
    async_scheduling: bool  # asked for; the engine also needs a runner that supports it
    seed: int
    platform_options: PlatformOptions  # the platform's typed options (``Platform.options_type``)
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding
    runner: str = "generate"  # "generate" or "pooling" (the engine serves only that kind of request)
    # LoRA (from EngineConfig; these "off" values only serve configs built by hand, e.g. conformance probes).
    enable_lora: bool = False
    max_loras: int = 0  # device slots (distinct adapters per step)
    max_lora_rank: int = 0
    max_cpu_loras: int = 0  # adapters in the host cache (>= max_loras)
    tensor_parallel_size: int = 1  # ranks each layer is split over
    pipeline_parallel_size: int = 1  # stages the layers are split into
    distributed_executor_backend: str = "uni"  # the registered executor that runs the ranks
    disable_custom_all_reduce: bool = False  # tensor parallelism sums through torch.distributed only
    device_offset: int = 0  # this engine's first local device (data-parallel replica r: r * world_size)
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8_e4m3" (resolve_kv_cache_dtype's names)
    calculate_kv_scales: bool = False  # FP8 cache: scales of layers the checkpoint leaves unset, measured at start
    # Batch-invariant kernels (kvik.layers.batch_invariant): results independent of batch composition.
    deterministic: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


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
    sliding_window: int | None = None  # the widest window of any layer (None: no layer slides)
    # Each layer's window, in layer order (None: that layer attends globally); empty when
    # no layer slides. Gemma 2/3 mix windowed and global layers in one model.
    layer_sliding_windows: tuple[int | None, ...] = ()
    attn_logits_soft_cap: float | None = None  # Gemma 2's attn_logit_softcapping
    eos_token_ids: frozenset[int] = frozenset()
    quantization: str | None = None  # registered quantization method name
    source: Any = None  # the ModelFormat / path that produced this model
