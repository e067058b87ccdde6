"""Deterministic mode's torch layers (kvik.layers.batch_invariant): a row's bits do not depend on its batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.activation import GeluTanhAndMul, SiluAndMul
from kvik.layers.batch_invariant import (
    PIECE,
    ROW_BLOCK,
    InvariantLinearMethod,
    InvariantRMSNorm,
    InvariantRotaryEmbedding,
    blocked_linear,
    make_batch_invariant,
    pointwise,
    torch_kernels,
)
from kvik.layers.linear import Linear
from kvik.layers.norm import GemmaRMSNorm, RMSNorm
from kvik.layers.rotary import RopeSettings, RotaryEmbedding
from kvik.quantization.base import QuantizationMethod
from kvik.quantization.unquantized import UnquantizedLinearMethod
from torch import nn

DTYPES = [torch.float32, torch.bfloat16]


def _rows(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 3 * ROW_BLOCK + 5), pos=st.integers(0, 200), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), bias=st.booleans())  # fmt: skip
def test_blocked_linear_row_is_independent_of_m(m: int, pos: int, seed: int, dtype: torch.dtype, bias: bool) -> None:
    pos %= m
    w = _rows(96, 160, dtype, 1) / 12
    b = _rows(1, 96, dtype, 2)[0] if bias else None
    target = _rows(1, 160, dtype, 3)
    x = _rows(m, 160, dtype, seed)
    x[pos] = target[0]
    alone = blocked_linear(target, w, b)[0]
    assert torch.equal(blocked_linear(x, w, b)[pos], alone)
    torch.testing.assert_close(alone, F.linear(target, w, b)[0], rtol=1e-2, atol=1e-2)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3 * PIECE), pos=st.integers(0, 3 * PIECE), seed=st.integers(0, 2**16))
def test_pointwise_element_is_independent_of_its_place(n: int, pos: int, seed: int) -> None:
    """exp/cos computed in fixed pieces: an element's bits do not depend on where it sits."""
    pos %= n
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 4
    value = torch.tensor([1.2345678])
    x[pos] = value[0]
    for fn in (torch.exp, torch.cos, F.silu):
        assert torch.equal(pointwise(fn, x)[pos], pointwise(fn, value)[0])
        torch.testing.assert_close(pointwise(fn, x), fn(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rows(dtype: torch.dtype) -> None:
    norm = RMSNorm(64, 1e-5, dtype)
    norm.weight.data = (1 + 0.1 * _rows(1, 64, torch.float32, 4)[0]).to(dtype)
    inv = InvariantRMSNorm(64, 1e-5, dtype)
    inv.weight.data = norm.weight.data.clone()
    x, res = _rows(70, 64, dtype, 5), _rows(70, 64, dtype, 6)
    full, summed = inv(x, res)
    for row in (0, 33, 69):
        alone, alone_sum = inv(x[row : row + 1], res[row : row + 1])
        assert torch.equal(alone[0], full[row]) and torch.equal(alone_sum[0], summed[row])
    torch.testing.assert_close(full, norm(x, res)[0], rtol=1e-2, atol=1e-2)
    assert inv(x.view(7, 10, 64)).shape == (7, 10, 64)  # per-head norms (Qwen3's q/k) keep their shape


def test_rotary_cos_sin_per_position() -> None:
    rope = InvariantRotaryEmbedding(32, RopeSettings(), 512)
    positions = torch.arange(300)
    cos, sin = rope.cos_sin(positions, torch.float32)
    for p in (0, 17, 299):
        c1, s1 = rope.cos_sin(positions[p : p + 1], torch.float32)
        assert torch.equal(c1[0], cos[p]) and torch.equal(s1[0], sin[p])
    ref = RotaryEmbedding(32, RopeSettings(), 512).cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, ref[0]) and torch.testing.assert_close(sin, ref[1])


class _Block(nn.Module):
    def __init__(self, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.proj = Linear(16, [8, 8])
        self.proj.weight.data.copy_(_rows(16, 16, torch.float32, 8))  # (the layer's storage starts uninitialised)
        self.norm, self.act = norm, act


def test_transform_swaps_layers_and_counts() -> None:
    model = _Block(RMSNorm(16), SiluAndMul())
    counts = make_batch_invariant(model, torch_kernels())
    assert isinstance(model.proj.quant_method, InvariantLinearMethod)
    assert type(model.norm) is InvariantRMSNorm
    assert counts == {"linear": 1, "InvariantRMSNorm": 1, "InvariantSiluAndMul": 1}
    x = _rows(5, 16, torch.float32, 7)
    torch.testing.assert_close(model.proj(x), F.linear(x, model.proj.weight))


class _Packed(UnquantizedLinearMethod):
    name = "packed4"


@pytest.mark.parametrize(
    ("norm", "act", "linear_method", "named"),
    [
        (GemmaRMSNorm(16), SiluAndMul(), None, "GemmaRMSNorm"),
        (RMSNorm(16), GeluTanhAndMul(), None, "GeluTanhAndMul"),
        (RMSNorm(16), SiluAndMul(), _Packed(), "packed4 linear"),
    ],
)
def test_transform_refuses_what_it_cannot_make_invariant(
    norm: nn.Module, act: nn.Module, linear_method: QuantizationMethod | None, named: str
) -> None:
    model = _Block(norm, act)
    if linear_method is not None:
        model.proj.quant_method = linear_method
    before = type(model.norm)
    with pytest.raises(ValueError, match=named):
        make_batch_invariant(model, torch_kernels())
    assert type(model.norm) is before  # nothing changed
