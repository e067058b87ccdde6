"""From a checkpoint path to the model facts the engine plans with (no torch needed)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from kvik.config import EngineConfig, ModelConfig
from kvik.layers.rope_settings import rope_max_len
from kvik.models.formats import ModelFormat
from kvik.plugins.manager import PluginManager, get_plugin_manager

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


def transformers_fallback_refusal(hf_config: Any) -> str | None:
    """Why transformers' own modelling code cannot run this config under kvik, or None when it can."""
    from transformers import AutoModelForCausalLM

    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return f"architectures {archs or '(none)'} name no causal LM (*ForCausalLM)"
    if type(hf_config) not in AutoModelForCausalLM._model_mapping:
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
    # dtype
    if engine_config.dtype == "auto":
        model_dtype = _dtype_name(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)) or "float32"
        if model_dtype not in _DTYPES:
            model_dtype = "float32"
        dtype = platform.default_dtype(model_dtype) if platform is not None else model_dtype
    else:
        dtype = engine_config.dtype
    # context length
    max_pos = int(getattr(hf, "max_position_embeddings", 0) or 0)
    if max_pos <= 0:
        raise ValueError(f"{fmt.path}: the model config has no max_position_embeddings")
    limit = rope_max_len(hf)
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
    # quantization
    quant = fmt.quantization()
    quant_name = quant[0] if quant else None
    if engine_config.quantization and engine_config.quantization != quant_name:
        raise ValueError(
            f"quantization={engine_config.quantization!r} was requested but the checkpoint is "
            f"{'quantized with ' + repr(quant_name) if quant_name else 'not quantized'}; kvik does not quantize "
            "on the fly. Leave quantization unset to use the checkpoint as it is."
        )
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
        layer_windows = (int(window),) * _required(hf, fmt, "num_hidden_layers")
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
