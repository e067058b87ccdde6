"""From a checkpoint path to the model facts the engine plans with (no torch needed)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from kvik.config import EngineConfig, ModelConfig
from kvik.layers.rope_settings import rope_max_len
from kvik.models.formats import ModelFormat
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.pooling.architectures import position_offset

if TYPE_CHECKING:
    from kvik.platforms.interface import Platform

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")


def resolve_format(path: str, manager: PluginManager | None = None, trust_remote_code: bool = False) -> ModelFormat:
    """The registered format that recognises ``path`` (the first, by name, whose ``matches`` is true).

    ``trust_remote_code`` lets the format's transformers loaders run code shipped with the checkpoint.
    """
    manager = manager or get_plugin_manager()
    registry = manager.model_formats
    for entry in registry.entries():
        cls = entry.load()
        if cls.matches(path):
            fmt: ModelFormat = cls(path)
            fmt.trust_remote_code = trust_remote_code
            return fmt
    for name, claimants in registry.conflicts.items():
        if any(e.load().matches(path) for e in claimants):
            registry.entry(name)  # raises PluginError naming both distributions
    names = ", ".join(registry.names()) or "none"
    if not os.path.exists(path):
        raise ValueError(
            f"model path {path!r} does not exist. kvik loads local checkpoints: a Hugging Face directory "
            f"(config.json + *.safetensors) or a file of another registered format (registered formats: {names})"
        )
    raise ValueError(
        f"{path!r} is not a checkpoint kvik recognises (registered formats: {names}). "
        "A Hugging Face directory needs a config.json next to its *.safetensors files."
    )


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def _int_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


FALLBACK_ARCHITECTURE = "TransformersForCausalLM"  # the registry name of kvik.models.transformers_fallback


def layer_types_window(cfg: Any, index: int) -> int | None:
    """Layer ``index``'s window from transformers' ``layer_types`` ("sliding_attention" slides with
    ``sliding_window``; any other kind, or a config without either, sees the whole context)."""
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None and window is not None:
        return int(window) if layer_types[index] == "sliding_attention" else None
    return None


def as_transformers_config(hf_config: Any) -> Any:
    """``hf_config`` as an instance of transformers' own class for its ``model_type`` (a format may
    build a lighter ``PretrainedConfig`` subclass: kvik_gguf's Llama config), or itself."""
    if type(hf_config).__module__.startswith("transformers."):
        return hf_config
    from transformers import AutoConfig

    values = {k: v for k, v in hf_config.to_dict().items() if k != "model_type"}
    try:
        return AutoConfig.for_model(hf_config.model_type, **values)
    except ValueError:  # a model_type transformers does not know: the caller refuses it by class
        return hf_config


def transformers_fallback_refusal(hf_config: Any) -> str | None:
    """Why transformers' own modelling code cannot run this config under kvik, or None when it can."""
    from transformers import AutoModelForCausalLM

    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return f"architectures {archs or '(none)'} name no causal LM (*ForCausalLM)"
    if type(as_transformers_config(hf_config)) not in AutoModelForCausalLM._model_mapping:
        return f"transformers has no causal LM for model_type {getattr(hf_config, 'model_type', None)!r}"
    if getattr(hf_config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not supported by the fallback"
    return None


def _required(hf: Any, fmt: ModelFormat, name: str) -> int:
    """A positive integer field of the model config, or a ValueError naming it."""
    value = getattr(hf, name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{fmt.path}: the model config's {name} is {value!r}; it must be a positive integer "
            f"(is config.json complete for {', '.join(getattr(hf, 'architectures', None) or ['this model'])}?)"
        )
    return value


def build_model_config(
    engine_config: EngineConfig,
    fmt: ModelFormat,
    manager: PluginManager | None = None,
    platform: Platform | None = None,
) -> ModelConfig:
    """Resolve the facts about the model the engine and runners need.

    ``platform`` (optional) picks the compute dtype for ``dtype='auto'`` via
    :meth:`Platform.default_dtype`; without it, the checkpoint's dtype is used.
    """
    manager = manager or get_plugin_manager()
    hf = fmt.load_hf_config()
    archs = list(getattr(hf, "architectures", None) or [])
    registry = manager.models
    for name in archs:
        if name in registry.conflicts:
            registry.entry(name)  # raises, naming both plugins that registered it
    arch = next((a for a in archs if a in registry and a != FALLBACK_ARCHITECTURE), None)
    if arch is None and engine_config.model_impl == "kvik":
        raise ValueError(
            f"model_impl='kvik' but kvik has no native implementation of {', '.join(archs) or 'this model'} "
            f"(registered: {', '.join(registry.names())}); model_impl='auto' runs transformers' code instead"
        )
    if engine_config.model_impl == "transformers":
        why_not = transformers_fallback_refusal(hf)
        if why_not is not None or FALLBACK_ARCHITECTURE not in registry:
            raise ValueError(
                f"model_impl='transformers' cannot run {', '.join(archs) or 'this model'}: "
                f"{why_not or 'the transformers fallback is not registered'}"
            )
        arch = FALLBACK_ARCHITECTURE
    elif arch is None:
        why_not = transformers_fallback_refusal(hf)
        if why_not is not None or FALLBACK_ARCHITECTURE not in registry:
            raise ValueError(
                f"model architecture {', '.join(archs) or '(none given in config.json)'} is not supported: "
                f"kvik has no native implementation (registered: {', '.join(registry.names()) or 'none'}) and "
                f"the transformers fallback cannot run it ({why_not or 'it is not registered'}). "
                "A plugin can add one through the kvik_register_models hook."
            )
        arch = FALLBACK_ARCHITECTURE
        logger.info("%s has no native kvik implementation: running transformers' modelling code", ", ".join(archs))
    # quantization
    quant_name = resolve_quantization(engine_config.quantization, fmt, manager)
    # dtype
    if engine_config.dtype == "auto":
        model_dtype = _dtype_name(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)) or "float32"
        if model_dtype not in _DTYPES:
            model_dtype = "float32"
        if platform is None:
            dtype = model_dtype
        elif quant_name is None:  # platforms written before the quantization argument keep working on dense models
            dtype = platform.default_dtype(model_dtype)
        else:
            dtype = platform.default_dtype(model_dtype, quant_name)
    else:
        dtype = engine_config.dtype
    # context length
    max_pos = int(getattr(hf, "max_position_embeddings", 0) or 0)
    if max_pos <= 0:
        raise ValueError(f"{fmt.path}: the model config has no max_position_embeddings")
    limit = rope_max_len(hf)
    offset = position_offset(hf)  # (XLM-)RoBERTa: positions start after pad_token_id
    if offset:
        max_pos = limit = max_pos - offset
    requested = engine_config.max_model_len
    if isinstance(requested, int):
        if requested > limit:
            raise ValueError(
                f"max_model_len={requested} is longer than the model supports ({limit} positions: "
                f"max_position_embeddings={max_pos} and its rope scaling); use max_model_len <= {limit}"
            )
        max_model_len = requested
    else:  # None or "auto": "auto" is narrowed later by the engine's memory planner
        max_model_len = max_pos
    # stop tokens
    eos = _int_ids(getattr(hf, "eos_token_id", None))
    gen_config = getattr(fmt, "generation_config", None)
    if callable(gen_config):
        eos |= _int_ids(gen_config().get("eos_token_id"))
    window = getattr(hf, "sliding_window", None)
    if hasattr(hf, "use_sliding_window") and not hf.use_sliding_window:
        window = None
    # Only a model with a window asks its architecture which layers slide: the class import
    # may need torch, and config resolution must not (the MLX platform runs without it).
    layer_window = getattr(registry.get(arch), "layer_sliding_window", None) if window else None
    layer_windows: tuple[int | None, ...] = ()
    if callable(layer_window):  # the architecture knows which layers slide (Qwen2: max_window_layers)
        layer_windows = tuple(layer_window(hf, i) for i in range(_required(hf, fmt, "num_hidden_layers")))
        windows = set(layer_windows) - {None}
        window = max(windows) if windows else None  # type: ignore[type-var]
        if window is None:
            layer_windows = ()
    elif window:
        n = _required(hf, fmt, "num_hidden_layers")
        if getattr(hf, "layer_types", None) is not None:  # transformers' own per-layer kinds
            layer_windows = tuple(layer_types_window(hf, i) for i in range(n))
        else:
            layer_windows = (int(window),) * n
    soft_cap = getattr(hf, "attn_logit_softcapping", None)
    for field_name in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        _required(hf, fmt, field_name)
    num_heads = int(hf.num_attention_heads)
    return ModelConfig(
        architecture=arch,
        hf_config=hf,
        dtype=dtype,
        num_layers=int(hf.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
        hidden_size=int(hf.hidden_size),
        vocab_size=int(hf.vocab_size),
        max_position_embeddings=max_pos,
        max_model_len=max_model_len,
        sliding_window=int(window) if window else None,
        layer_sliding_windows=layer_windows,
        attn_logits_soft_cap=float(soft_cap) if soft_cap else None,
        eos_token_ids=frozenset(eos),
        quantization=quant_name,
        source=fmt,
    )


def resolve_quantization(requested: str | None, fmt: ModelFormat, manager: PluginManager) -> str | None:
    """The quantization method the model runs with: the checkpoint's, or one that quantizes dense weights at load.

    ValueError (naming the format and the installed methods) for a checkpoint
    format no plugin handles, a request that contradicts the checkpoint, or
    on-the-fly quantization by a method that cannot do it.
    """
    quant = fmt.quantization()
    quant_name = quant[0] if quant else None
    registry = manager.quantization_methods
    known = ", ".join(f"{e.name} ({e.source})" for e in registry.entries()) or "none"
    if quant_name is not None and quant_name not in registry and quant_name not in registry.conflicts:
        raise ValueError(
            f"{fmt.path}: the checkpoint is quantized with quant_method={quant_name!r}, which no installed "
            f"plugin handles; installed quantization methods: {known}. Install a plugin for {quant_name!r} "
            "(see docs/quantization.md) or use a dense or supported checkpoint."
        )
    if not requested or requested == quant_name:
        return quant_name
    if quant_name is not None:
        raise ValueError(
            f"quantization={requested!r} was requested but the checkpoint is already quantized with "
            f"{quant_name!r}; leave quantization unset to use the checkpoint as it is"
        )
    if requested not in registry:
        raise ValueError(f"quantization={requested!r} is not an installed quantization method; installed: {known}")
    method_cls = registry.get(requested)
    if not getattr(method_cls, "quantizes_dense_checkpoints", False):
        online = [e.name for e in registry.entries() if _quantizes_dense(e)]
        raise ValueError(
            f"quantization={requested!r} loads checkpoints already quantized in that format; it cannot quantize "
            f"this dense checkpoint at load. Methods that can: {', '.join(online) or 'none installed'}; "
            "or leave quantization unset"
        )
    return requested


def _quantizes_dense(entry: Any) -> bool:
    try:
        return bool(getattr(entry.load(), "quantizes_dense_checkpoints", False))
    except Exception:  # a broken plugin is reported by `kvik plugins`, not here
        return False
