"""From resolved model facts to a loaded torch model: build the architecture, load and transform weights."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from kvik.config import ModelConfig
from kvik.layers.embedding import LMHead
from kvik.layers.linear import Linear
from kvik.models.formats import ModelFormat
from kvik.models.interface import ModelBuildContext
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.quantization.unquantized import UnquantizedLinearMethod


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
    dummy_seed: int | None = None,
) -> nn.Module:
    """Build the registered architecture on ``ctx.device`` and load the checkpoint into it.

    ``quantized`` is passed to :meth:`ModelFormat.iter_weights`. Raises
    ``ValueError`` naming the parameters the checkpoint left unset. With
    ``dummy_seed`` no weight is read: parameters get seeded random values
    (``load_format="dummy"``, for benchmarks and shapes too large to write).
    """
    manager = manager or get_plugin_manager()
    model_cls = manager.models.get(model_config.architecture)
    model: nn.Module = model_cls(ctx)
    if dummy_seed is not None:
        if quantized:
            raise ValueError("load_format='dummy' makes dense random weights; this checkpoint is quantized")
        _fill_dummy_weights(model, dummy_seed)
    else:
        weights = fmt.iter_weights(quantized)
        lazy = getattr(fmt, "iter_weights_lazy", None)
        if ctx.parallel.is_parallel and callable(lazy):  # each rank reads only its slices and its layers
            weights = lazy(quantized)
        model.load_weights(_progress(weights, fmt.weight_bytes()))  # type: ignore[operator]
        missing_fn = getattr(model, "missing_weights", None)
        missing = list(missing_fn()) if callable(missing_fn) else []
        if missing:
            shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            raise ValueError(f"checkpoint {fmt.path} has no weights for: {shown}; is it complete?")
    # Also after dummy weights: a method that quantizes dense weights at load (fp8) does it here.
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    return model.eval()


@torch.no_grad()
def _fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights of the right shapes: matrices N(0, 0.02), norm scales 1, other vectors 0.

    On the CPU the values come from one CPU generator, so the same seed gives the same model on any
    CPU. A model on an accelerator draws on the device instead, one generator per parameter seeded
    from (seed, its index): drawing 8B values on the host took over a minute of a benchmark's start,
    on the device it takes milliseconds. The same seed still gives the same model on the same kind of
    device.
    """
    cpu_generator = torch.Generator().manual_seed(seed)
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.dim() >= 2:
            if param.device.type == "cpu":
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=cpu_generator)
            else:
                generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + index)
                values = torch.empty(param.shape, dtype=torch.float32, device=param.device)
                values.normal_(0.0, 0.02, generator=generator)
        elif "norm" in name:
            values = torch.ones(param.shape)
        else:
            values = torch.zeros(param.shape)
        param.copy_(values.to(param.dtype))


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized Linear's storage with a dense ``dtype`` weight; return how many changed.

    Quantization as a transform on a built model: a quantized checkpoint is
    loaded through its method, then each layer's :meth:`QuantizationMethod.dequantize`
    becomes a plain weight, so platforms without kernels for the format still run it.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, LMHead) and module.packed_matmul is not None:  # a tied head back to its dense rows
            module.packed_matmul = None
            changed += 1
            continue
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
