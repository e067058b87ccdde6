"""Conformance checks for quantization-method plugins.

Use in a plugin's tests::

    from kvik.testing.conformance.quantization import check_quantization_method

    def test_conformance():
        check_quantization_method(MyMethod, {"bits": 8}, shapes=[(64, [32]), (64, [16, 16, 32])])

The method must implement the optional ``quantize_for_test(weight)`` so the
check can produce checkpoint values and load them through the method's own
``load_weight``; the check then verifies that ``apply(x) == x @ dequantize().T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvik.layers.linear import Linear
from kvik.quantization.base import QuantizationMethod

DEFAULT_SHAPES: tuple[tuple[int, list[int]], ...] = (
    (64, [48]),  # one projection
    (64, [64, 32, 32]),  # merged q/k/v shards of different sizes
    (128, [96, 96]),  # merged gate/up
)


def _build_layer(
    method: QuantizationMethod, input_size: int, output_sizes: list[int], dtype: torch.dtype, bias: bool, seed: int
) -> tuple[Linear, torch.Tensor, torch.Tensor | None]:
    """A Linear loaded shard by shard through the method; returns it with the dense weight and bias used."""
    gen = torch.Generator().manual_seed(seed)
    layer = Linear(input_size, output_sizes, bias=bias, quant_method=method, dtype=dtype)
    dense = torch.randn(sum(output_sizes), input_size, generator=gen) / input_size**0.5  # [out, in] float32
    merged = len(output_sizes) > 1
    start = 0
    for shard, size in enumerate(output_sizes):
        values = method.quantize_for_test(dense[start : start + size].clone())
        if not values:
            raise AssertionError(f"{type(method).__name__}.quantize_for_test returned no values")
        for name, value in values.items():
            layer.load(name, value, shard if merged else None)
        start += size
    bias_values = None
    if bias:
        bias_values = torch.randn(sum(output_sizes), generator=gen)
        layer.load("bias", bias_values.to(dtype))
    method.process_weights_after_loading(layer)
    return layer, dense, bias_values


def check_quantization_method(
    method_cls: type[QuantizationMethod],
    config: dict[str, Any] | None = None,
    shapes: Sequence[tuple[int, list[int]]] = DEFAULT_SHAPES,
    dtype: torch.dtype = torch.float32,
    batch_sizes: Sequence[int] = (1, 7),
    rtol: float = 1e-3,
    max_weight_rel_error: float = 0.25,
    seed: int = 0,
) -> None:
    """Check a QuantizationMethod against the contract; AssertionError lists every problem found.

    For each ``(input_size, output_sizes)`` in ``shapes`` (several sizes = a
    merged layer loaded shard by shard): build a :class:`Linear` with the method
    built by ``method_cls.from_config(config)``, load random weights produced by
    ``quantize_for_test``, run ``process_weights_after_loading``, then check

    * ``dequantize()`` is ``[sum(output_sizes), input_size]`` and within
      ``max_weight_rel_error`` (relative Frobenius error) of the dense weight
      that was quantized: catches swapped shards and transposes;
    * ``apply(x)`` equals ``x @ dequantize().T`` for 2-D and 3-D ``x``, within
      ``rtol`` of the output's scale (computed in float32);
    * the bias is added once, ``weight_bytes`` is positive, and ``name`` is set;
    * where the method states an input row quantization for a batch
      (:meth:`~kvik.quantization.base.QuantizationMethod.input_row_quantization`),
      ``apply_quantized_rows`` on the rows quantized as stated gives ``apply(x)``.
    """
    problems: list[str] = []
    if not isinstance(getattr(method_cls, "name", None), str):
        problems.append("the class must set name (the quant_method string it handles)")
    method = method_cls.from_config(dict(config or {}))
    if dtype not in method.supported_act_dtypes:
        raise AssertionError(f"dtype {dtype} is not in {method_cls.__name__}.supported_act_dtypes; pick another")
    for index, (input_size, output_sizes) in enumerate(shapes):
        where = f"layer in={input_size} out={output_sizes}"
        for bias in (False, True):
            try:
                layer, dense, bias_values = _build_layer(
                    method, input_size, list(output_sizes), dtype, bias, seed + index
                )
            except NotImplementedError as exc:
                raise AssertionError(str(exc)) from exc
            deq = method.dequantize(layer).float()
            expected_shape = (sum(output_sizes), input_size)
            if tuple(deq.shape) != expected_shape:
                problems.append(f"{where}: dequantize() shape {tuple(deq.shape)}, expected {expected_shape}")
                continue
            rel = float((deq - dense).norm() / dense.norm())
            if rel > max_weight_rel_error:
                problems.append(
                    f"{where}: dequantize() is {rel:.3f} (relative) away from the quantized weight, more than "
                    f"{max_weight_rel_error}; shards swapped or transposed?"
                )
            gen = torch.Generator().manual_seed(seed + 100 + index)
            for batch in batch_sizes:
                for shape in ((batch, input_size), (2, batch, input_size)):
                    x = torch.randn(*shape, generator=gen).to(dtype)
                    y = layer(x)
                    reference = x.float() @ deq.T
                    if bias_values is not None:
                        reference = reference + bias_values.to(dtype).float()
                    if tuple(y.shape) != (*shape[:-1], sum(output_sizes)):
                        problems.append(f"{where}: apply() on {list(shape)} gave shape {list(y.shape)}")
                        continue
                    err = float((y.float() - reference).abs().max())
                    scale = float(reference.abs().max()) or 1.0
                    if err > rtol * scale:
                        problems.append(
                            f"{where}, bias={bias}, x {list(shape)}: apply(x) differs from x @ dequantize().T by "
                            f"{err:.3g} (output scale {scale:.3g}, allowed {rtol * scale:.3g})"
                        )
                    if not bias:
                        problems.extend(_row_quantized_problems(method, layer, x, y, where))
            if method.weight_bytes(layer) <= 0:
                problems.append(f"{where}: weight_bytes() must be positive")
    if problems:
        raise AssertionError(
            f"quantization method {method_cls.__name__} does not conform:\n  - " + "\n  - ".join(problems)
        )


def _row_quantized_problems(
    method: QuantizationMethod, layer: Linear, x: torch.Tensor, y: torch.Tensor, where: str
) -> list[str]:
    """``apply_quantized_rows`` against ``y``, the bias-free layer's ``apply(x)``, where the method states its input
    row quantization for x's rows."""
    rows = x.reshape(-1, x.shape[-1])
    spec = method.input_row_quantization(layer, rows.shape[0])
    if spec is None:
        return []
    codes, scales = spec.quantize(rows)
    got = method.apply_quantized_rows(layer, codes, scales, x.dtype)
    want = y.reshape(rows.shape[0], -1)
    if tuple(got.shape) != tuple(want.shape) or not torch.equal(got, want):
        return [f"{where}, {rows.shape[0]} rows: apply_quantized_rows on rows quantized as stated ({spec}) is not apply(x)"]
    return []
