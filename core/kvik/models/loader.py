"""From a path to a loaded model: pick the format, resolve model facts, build and load."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvik.config import EngineConfig, ModelConfig
from kvik.layers.linear import Linear
from kvik.layers.rotary import rope_max_len
from kvik.models.formats import ModelFormat
from kvik.models.interface import ModelBuildContext
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from kvik.platforms.interface import Platform

_DTYPES = ("float32", "float16", "bfloat16")
# "org/name" with Hub-legal characters and no leading ./ or /: what a Hub model id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_format(path: str, manager: PluginManager | None = None) -> ModelFormat:
    """The registered format that recognises ``path`` (the first, by name, whose ``matches`` is true)."""
    manager = manager or get_plugin_manager()
    registry = manager.model_formats
    for entry in registry.entries():
        cls = entry.load()
        if cls.matches(path):
            return cls(path)  # type: ignore[no-any-return]
    for name, claimants in registry.conflicts.items():
        if any(e.load().matches(path) for e in claimants):
            registry.entry(name)  # raises PluginError naming both distributions
    names = ", ".join(registry.names()) or "none"
    if not os.path.exists(path) and _HUB_ID.match(path):
        raise ValueError(
            f"model path {path!r} does not exist; it looks like a Hugging Face Hub id, and kvik does not "
            "download models yet. Download it first, then pass the directory: "
            f"`hf download {path} --local-dir ./{path.split('/')[-1]}` (pip install huggingface_hub), "
            f"then --model ./{path.split('/')[-1]}"
        )
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
    arch = next((a for a in archs if a in registry or a in registry.conflicts), None)
    if arch is not None and arch in registry.conflicts:
        registry.entry(arch)  # raises PluginError naming both distributions, as docs/plugins.md says
    if arch is None:
        raise ValueError(
            f"model architecture {', '.join(archs) or '(none given in config.json)'} is not supported; "
            f"registered architectures: {', '.join(registry.names()) or 'none'}. "
            "A plugin can add one through the kvik_register_models hook."
        )
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
    layer_window = getattr(registry.get(arch), "layer_sliding_window", None)
    if callable(layer_window):  # the architecture knows which layers slide (Qwen2: max_window_layers)
        windows = {layer_window(hf, i) for i in range(int(hf.num_hidden_layers))} - {None}
        window = max(windows) if windows else None
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
        eos_token_ids=frozenset(eos),
        quantization=quant_name,
        source=fmt,
    )


def _progress(weights: Iterable[tuple[str, Any]], total_bytes: int) -> Iterator[tuple[str, Any]]:
    """Wrap the weight stream in a byte-counting progress bar on stderr (only on a TTY)."""
    from tqdm import tqdm

    from kvik.engine import progress

    if sys.stderr.isatty():
        progress.interrupt()  # the bar draws on its own line
    bar = tqdm(
        total=total_bytes or None,
        unit="B",
        unit_scale=True,
        desc="Loading weights",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
    )
    with bar:
        for name, value in weights:
            yield name, value
            if isinstance(value, torch.Tensor):
                bar.update(value.numel() * value.element_size())


def load_model(
    model_config: ModelConfig,
    ctx: ModelBuildContext,
    fmt: ModelFormat,
    quantized: bool,
    manager: PluginManager | None = None,
) -> nn.Module:
    """Build the registered architecture on ``ctx.device`` and load the checkpoint into it.

    ``quantized`` is passed to :meth:`ModelFormat.iter_weights`. Raises
    ``ValueError`` naming the parameters the checkpoint left unset.
    """
    manager = manager or get_plugin_manager()
    model_cls = manager.models.get(model_config.architecture)
    model: nn.Module = model_cls(ctx)
    model.load_weights(_progress(fmt.iter_weights(quantized), fmt.weight_bytes()))  # type: ignore[operator]
    missing_fn = getattr(model, "missing_weights", None)
    missing = list(missing_fn()) if callable(missing_fn) else []
    if missing:
        shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ValueError(f"checkpoint {fmt.path} has no weights for: {shown}; is it complete?")
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    return model.eval()


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized Linear's storage with a dense ``dtype`` weight; return how many changed.

    Quantization as a transform on a built model: a quantized checkpoint is
    loaded through its method, then each layer's :meth:`QuantizationMethod.dequantize`
    becomes a plain weight, so platforms without kernels for the format still run it.
    """
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear) or isinstance(module.quant_method, UnquantizedLinearMethod):
            continue
        dense = module.quant_method.dequantize(module).to(dtype)
        for name in [n for n in module._parameters if n != "bias"]:
            delattr(module, name)
        for name in list(module._buffers):
            delattr(module, name)
        module.quant_method = UnquantizedLinearMethod()
        module.weight = nn.Parameter(dense.contiguous(), requires_grad=False)
        changed += 1
    return changed
