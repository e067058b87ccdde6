"""One step from what the user asked for to the frozen configuration the engine runs with.

Order, each layer filling only what the ones before left open:

1. the user's :class:`~kvik.config.EngineConfig` (fields not ``None``);
2. the platform's :meth:`~kvik.platforms.Platform.engine_defaults` for the rest;
3. the plugins' ``kvik_configure`` hooks, which see the filled-in options and may
   adjust them (each change is attributed to the plugin that made it);
4. values derived from the model (a prefill must fit one step without chunked
   prefill) and the platform's typed options;
5. :meth:`~kvik.platforms.Platform.configure` checks the frozen result once.

The result records where every value that is not a plain field default came
from, so the start-up log can say why the engine runs as it does.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from kvik.attention.selector import select_attention_backend
from kvik.config import (
    EngineConfig,
    LoadFormat,
    ModelConfig,
    ResolvedConfig,
    SchedulingPolicy,
    WeightsMode,
    resolve_kv_cache_dtype,
)
from kvik.distributed.checks import check_parallel
from kvik.models.formats import ModelFormat
from kvik.models.hub import TOKENIZER_FILES, resolve_model_path
from kvik.models.model_config import FALLBACK_ARCHITECTURE, build_model_config, resolve_format
from kvik.plugins.registry import PluginError
from kvik.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from kvik.platforms.interface import Platform
    from kvik.plugins.manager import PluginManager

USER = "user"
DEFAULT = "default"

# The user's fields that ``ResolvedConfig`` takes as they are once filled in.
_PASSED_THROUGH = (
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "long_prefill_token_threshold",
    "gpu_memory_utilization",
    "enforce_eager",
    "disable_custom_all_reduce",
    "async_scheduling",
    "seed",
    "trust_remote_code",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "deterministic",
)


@dataclass(slots=True)
class ConfigResolution:
    """The resolved config and model facts, where the config's values came from, and the notes to log."""

    config: ResolvedConfig
    model_config: ModelConfig
    model_format: ModelFormat
    sources: dict[str, str] = field(default_factory=dict)  # field (or "platform_options.x") -> user/platform/plugin
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """One line per option, its value and (when not a field default) where it came from."""
        lines = []
        values = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "platform_options"}
        options = self.config.platform_options
        values.update({f"platform_options.{f.name}": getattr(options, f.name) for f in fields(options)})
        width = max(len(name) for name in values)
        for name, value in values.items():
            shown = value.value if isinstance(value, SchedulingPolicy | WeightsMode | LoadFormat) else value
            source = self.sources.get(name, DEFAULT)
            lines.append(f"  {name:<{width}}  {shown!r}" + ("" if source == DEFAULT else f"  ({source})"))
        return "\n".join(lines)


def _user_set(user: EngineConfig) -> dict[str, Any]:
    """The options the user gave a value (a ``None`` default left as ``None`` is unset)."""
    chosen = {}
    for f in fields(EngineConfig):
        value = getattr(user, f.name)
        if f.name == "platform_options" or value is None:
            continue
        chosen[f.name] = value
    return chosen


def resolve_config(user: EngineConfig, platform: Platform, manager: PluginManager) -> ConfigResolution:
    """Resolve ``user`` for ``platform`` and its model into a frozen :class:`ResolvedConfig`.

    Reads the checkpoint's metadata (format, config, quantization), not its
    weights, so it is cheap and needs no device runtime. Raises ``ValueError``
    with advice for a configuration that cannot run.
    """
    if user.model is None:
        raise ValueError("no model given: set model= to a checkpoint path")
    model_path = resolve_model_path(user.model, user.revision, user.download_dir)
    tokenizer = model_path
    if user.tokenizer is not None:
        tokenizer = resolve_model_path(user.tokenizer, user.revision, user.download_dir, TOKENIZER_FILES)
    model_format = resolve_format(model_path, manager, trust_remote_code=user.trust_remote_code)
    model_config = build_model_config(user, model_format, manager, platform)
    sources = {name: USER for name, value in _user_set(user).items() if value != _field_default(name)}
    draft = copy.deepcopy(user)
    defaults = platform.engine_defaults(user, model_config)
    unknown = sorted(set(defaults) - {f.name for f in fields(EngineConfig)})
    if unknown:
        raise TypeError(f"platform {platform.name!r} gave defaults for unknown options: {', '.join(unknown)}")
    for name, value in defaults.items():
        if getattr(draft, name) is None:
            setattr(draft, name, value)
            sources[name] = f"platform {platform.name}"
    notes = manager.run_configure(draft, sources)
    draft.__post_init__()  # a plugin's value gets the same checks as the user's

    _whole_prompts_for_encoders(draft, model_config, sources, notes)
    max_num_batched_tokens = draft.max_num_batched_tokens
    assert max_num_batched_tokens is not None and draft.block_size is not None and draft.max_num_seqs is not None, (
        f"platform {platform.name!r} left block_size, max_num_seqs or max_num_batched_tokens unset"
    )
    if not draft.enable_chunked_prefill and max_num_batched_tokens < model_config.max_model_len:
        # Without chunking a whole prompt runs in one step, so one step must hold the longest.
        max_num_batched_tokens = model_config.max_model_len
        sources["max_num_batched_tokens"] = "derived: enable_chunked_prefill=False needs max_model_len per step"

    quantized_weights = WeightsMode.DEQUANTIZE
    online = model_config.quantization is not None and model_format.quantization() is None
    if online:
        # quantization="fp8" on a dense checkpoint: quantizing at load only to dequantize again is pointless.
        if draft.quantized_weights == WeightsMode.DEQUANTIZE.value:
            raise ValueError(
                f"quantization={model_config.quantization!r} quantizes this dense checkpoint at load, and "
                "quantized_weights='dequantize' would undo that; leave quantized_weights unset (or 'quantized')"
            )
        quantized_weights = WeightsMode.QUANTIZED
    elif draft.quantized_weights != "auto":
        quantized_weights = WeightsMode(draft.quantized_weights)
    elif model_config.quantization is not None and draft.enable_lora:
        sources["quantized_weights"] = "derived: enable_lora adapts dequantized weights only"
        notes.append(f"enable_lora: the {model_config.quantization} weights are dequantized at load")
    elif model_config.quantization is not None and draft.deterministic:
        sources["quantized_weights"] = "derived: deterministic=True runs dense (batch-invariant) matmuls"
        notes.append(f"deterministic: the {model_config.quantization} weights are dequantized at load")
    elif model_config.quantization is not None:
        quantized_weights = WeightsMode(platform.quantized_weights_mode(draft, model_config.quantization))
        sources["quantized_weights"] = f"platform {platform.name}"
    if draft.enable_lora:
        _check_lora(draft, model_config, quantized_weights)
    checkpoint_quant = model_format.quantization()
    if checkpoint_quant is not None and checkpoint_quant[1].get("kv_cache_scheme") and draft.kv_cache_dtype == "auto":
        notes.append(
            f"the checkpoint carries FP8 KV-cache scales (kv_cache_scheme); kv_cache_dtype='auto' keeps K/V in "
            f"{model_config.dtype}: pass kv_cache_dtype='fp8' to use them (and hold twice the tokens)"
        )
    if draft.deterministic:
        _check_deterministic(draft, model_config, quantized_weights)

    options, option_notes = _platform_options(draft, platform, sources)
    notes.extend(option_notes)
    passed = {name: getattr(draft, name) for name in _PASSED_THROUGH}
    passed["max_num_batched_tokens"] = max_num_batched_tokens
    config = ResolvedConfig(
        **passed,
        model=model_path,
        model_name=user.model,
        tokenizer=tokenizer,
        platform=platform.name,
        scheduling_policy=SchedulingPolicy(draft.scheduling_policy),
        num_kv_blocks=draft.num_kv_blocks or 0,
        kv_cache_memory=draft.kv_cache_memory or 0,
        fit_max_model_len=draft.max_model_len == "auto",
        quantized_weights=quantized_weights,
        load_format=LoadFormat(draft.load_format),
        attention_backend=draft.attention_backend or "",
        platform_options=options,
        speculative_config=_speculative(draft, manager),
        runner=_resolve_runner(draft.runner, model_config, notes),
        max_cpu_loras=max(draft.max_cpu_loras or draft.max_loras, draft.max_loras),
        distributed_executor_backend=_executor_name(draft, platform, sources),
        device_offset=draft.data_parallel_rank * draft.tensor_parallel_size * draft.pipeline_parallel_size,
        kv_cache_dtype=resolve_kv_cache_dtype(draft.kv_cache_dtype),
        calculate_kv_scales=draft.calculate_kv_scales,
    )
    if draft.max_cpu_loras is None and draft.enable_lora:
        sources["max_cpu_loras"] = "derived: max_loras"
    check_parallel(config, model_config, platform, manager)  # one ValueError listing every problem
    # The backend is chosen here, once, from the model's facts: the runner builds what the config names.
    backend = select_attention_backend(
        platform,
        config,
        model_config.head_dim,
        model_config.dtype,
        model_config.sliding_window,
        manager,
        logits_soft_cap=model_config.attn_logits_soft_cap,
    )
    if not config.attention_backend:
        # The registry name (a class may be registered under another name than its own ``name``).
        chosen = next(n for n in platform.attention_backends if _registered_as(manager, n, backend))
        sources["attention_backend"] = f"platform {platform.name}"
        config = replace(config, attention_backend=chosen)
    notes.extend(platform.configure(config, model_config))
    return ConfigResolution(config, model_config, model_format, sources, notes)


def _whole_prompts_for_encoders(
    draft: EngineConfig, model_config: ModelConfig, sources: dict[str, str], notes: list[str]
) -> None:
    """A bidirectional encoder attends over the whole prompt at once: no chunks, no prefix-cache hits; and it keeps
    no KV cache, so one bookkeeping block per request (unless the user set ``block_size``)."""
    from kvik.pooling.architectures import is_encoder_architecture

    if not is_encoder_architecture(model_config.architecture):
        return
    why = f"derived: {model_config.architecture} is a bidirectional encoder (whole prompts per step)"
    for name in ("enable_chunked_prefill", "enable_prefix_caching"):
        if getattr(draft, name):
            if sources.get(name) == USER:
                notes.append(f"{name}=True is ignored: {model_config.architecture} needs whole prompts per step")
            setattr(draft, name, False)
            sources[name] = why
    if sources.get("block_size") != USER:
        # An encoder keeps no KV cache: its blocks are the scheduler's bookkeeping only (no memory behind
        # them). One block per request makes that bookkeeping one allocation and one free per request instead
        # of one per 16 tokens, which on the GPU was a visible share of an embedding step's host time.
        draft.block_size = model_config.max_model_len
        sources["block_size"] = f"derived: {model_config.architecture} keeps no KV cache (one bookkeeping block per request)"


def _check_lora(draft: EngineConfig, model_config: ModelConfig, quantized_weights: WeightsMode) -> None:
    """ValueError for LoRA combinations kvik cannot run."""
    if model_config.quantization is not None and quantized_weights is WeightsMode.QUANTIZED:
        raise ValueError(
            f"enable_lora with quantized_weights='quantized' ({model_config.quantization} weights kept packed) is not "
            "supported; use quantized_weights='dequantize' (or leave it 'auto') to run adapters on this model"
        )
    if draft.runner == "pooling":
        raise ValueError("enable_lora applies to generation; it is not supported with runner='pooling'")
    if model_config.architecture == FALLBACK_ARCHITECTURE:
        raise ValueError(
            "enable_lora needs kvik's native modelling code; this model runs transformers' (the fallback, or "
            "model_impl='transformers'), which kvik cannot add adapter slots to"
        )


def _check_deterministic(draft: EngineConfig, model_config: ModelConfig, quantized_weights: WeightsMode) -> None:
    """ValueError listing what deterministic=True cannot make batch-invariant (docs/deterministic.md)."""
    problems = []
    if quantized_weights is WeightsMode.QUANTIZED:
        problems.append(
            f"{model_config.quantization} weights kept packed (their kernels are not batch-invariant; "
            "use quantized_weights='dequantize', or leave quantization unset for a dense checkpoint)"
        )
    if draft.tensor_parallel_size > 1:
        problems.append(
            f"tensor_parallel_size={draft.tensor_parallel_size} (an all-reduce's summation order depends on the "
            "message size; pipeline_parallel_size is fine)"
        )
    if draft.enable_lora:
        problems.append("enable_lora (the adapter kernels are not batch-invariant)")
    if draft.speculative_config is not None:
        problems.append("speculative decoding (verification steps are not covered)")
    if draft.runner == "pooling":
        problems.append("runner='pooling' (deterministic mode covers generation)")
    if resolve_kv_cache_dtype(draft.kv_cache_dtype) != "auto":
        problems.append("kv_cache_dtype='fp8' (the batch-invariant attention reads a model-dtype cache; use 'auto')")
    if model_config.architecture == FALLBACK_ARCHITECTURE:
        problems.append("transformers' modelling code (the fallback or model_impl='transformers'): kvik's native code only")
    if problems:
        raise ValueError("deterministic=True does not support " + "; ".join(problems))


def _resolve_runner(requested: str, model_config: ModelConfig, notes: list[str]) -> str:
    """"generate" or "pooling" for this model; a ``*ForCausalLM`` run for pooling is built as its bare body."""
    from kvik.pooling.architectures import is_pooling_architecture, pooling_architecture

    arch = model_config.architecture
    if is_pooling_architecture(arch):
        if requested == "generate":
            raise ValueError(f"{arch} is a pooling model (embeddings / classification): it cannot generate; "
                             "use runner='pooling' (or 'auto')")  # fmt: skip
        return "pooling"
    if requested != "pooling":
        return "generate"
    body = pooling_architecture(arch)
    if body is None:
        raise ValueError(f"runner='pooling' needs a Llama, Mistral, Qwen2 or Qwen3 body; {arch} has no pooling variant")
    notes.append(f"runner=pooling: {arch} runs as {body} (its hidden states are pooled, no logits)")
    model_config.architecture = body
    return "pooling"


def _executor_name(draft: EngineConfig, platform: Platform, sources: dict[str, str]) -> str:
    if draft.distributed_executor_backend is not None:
        return draft.distributed_executor_backend
    if draft.tensor_parallel_size * draft.pipeline_parallel_size > 1:
        sources["distributed_executor_backend"] = "derived: more than one rank"
        return "mp"
    if draft.data_parallel_rank > 0 and platform.device_count() is not None:
        # A later replica's device is not this process's: its rank runs in a process bound to it.
        sources["distributed_executor_backend"] = "derived: a data-parallel replica on its own device"
        return "mp"
    return "uni"


def _platform_options(draft: EngineConfig, platform: Platform, sources: dict[str, str]) -> tuple[Any, list[str]]:
    """The platform's typed options from ``platform_options`` (and the top-level ``num_threads``)."""
    names = platform.option_names()
    given = dict(draft.platform_options)
    notes = []
    if draft.num_threads is not None:
        if "num_threads" in names:
            given.setdefault("num_threads", draft.num_threads)
        else:
            notes.append(f"num_threads={draft.num_threads} is ignored: platform {platform.name!r} does not use it")
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(
            f"platform {platform.name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(names) or 'none'}"
        )
    options = platform.resolve_options(given, draft)
    for f in fields(options):
        if f.name in given:
            sources[f"platform_options.{f.name}"] = USER
        elif f.default is MISSING or getattr(options, f.name) != f.default:
            sources[f"platform_options.{f.name}"] = f"platform {platform.name}"
    return options, notes


def _speculative(draft: EngineConfig, manager: PluginManager) -> SpeculativeConfig | None:
    """The checked speculative config; ValueError for a method no plugin registered."""
    if draft.speculative_config is None:
        return None
    spec = SpeculativeConfig.parse(draft.speculative_config)
    methods = manager.spec_proposers.names()
    if spec.method not in methods:
        raise ValueError(
            f"speculative_config: unknown method {spec.method!r}; registered methods: {', '.join(sorted(methods))}"
        )
    return spec
def _registered_as(manager: PluginManager, name: str, backend: type) -> bool:
    try:
        return manager.attention_backends.get(name) is backend
    except PluginError:
        return False


def _field_default(name: str) -> Any:
    f = _FIELDS[name]
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


_FIELDS = {f.name: f for f in fields(EngineConfig)}
