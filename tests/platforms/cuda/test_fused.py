"""Fused Triton layers against the eager kvik.layers modules they replace.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
The residual add matches bit for bit; RMSNorm, SiLU-and-mul and rotary within
one unit in the last place of the output dtype: the float32 reduction order and
exp may differ, and on a GPU Triton's compiler may keep a product in float32
(or contract it into an FMA) where eager rounds it to 16 bits (seen on an H100:
rotary differed from eager in the last bit of some bf16/fp16 elements).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kvik.layers.activation import SiluAndMul
from kvik.layers.norm import AddLayerNorm, RMSNorm
from kvik.layers.rotary import RopeSettings, RotaryEmbedding
from kvik_cuda.fused import FusedAddLayerNorm, FusedRMSNorm, FusedRotaryEmbedding, FusedSiluAndMul, fuse_layers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Triton's interpreter converts float32 -> bfloat16 by truncation, not round-to-nearest-even
# as GPUs (and torch) do, so bf16 results are bit-exact only on a GPU; under the
# interpreter they are checked to bf16 resolution instead.
INTERPRETED_BF16 = DEVICE == "cpu"


def _exact(got: torch.Tensor, want: torch.Tensor) -> None:
    if INTERPRETED_BF16 and want.dtype == torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)
    else:
        assert torch.equal(got, want)


def _ulp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(want.dtype).eps * (2 if INTERPRETED_BF16 and want.dtype == torch.bfloat16 else 1)
    tol = 2 * eps * want.float().abs() + 1e-6
    bad = (got.float() - want.float()).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements differ by more than one ulp"


def _fused(module: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(module)
    fuse_layers(clone)
    return clone


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 576])
def test_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-5, dtype, DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    fused = _fused(norm)
    assert type(fused) is FusedRMSNorm
    x = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    r = torch.randn(7, hidden, dtype=dtype, device=DEVICE)
    _ulp_close(fused(x), norm(x))
    out, res = fused(x, r)
    want_out, want_res = norm(x, r)
    _exact(res, want_res)  # the residual add rounds exactly as eager does
    _ulp_close(out, want_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,n", [(64, 7), (768, 5), (96, 33)])
def test_add_layer_norm(dtype: torch.dtype, hidden: int, n: int) -> None:
    """BERT's LayerNorm(dense(x) + residual): rows of a block past ``n`` masked, widths not a power of 2."""
    torch.manual_seed(1)
    norm = AddLayerNorm(hidden, eps=1e-12, dtype=dtype, device=DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    norm.bias.data = (0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    fused = _fused(norm)
    assert type(fused) is FusedAddLayerNorm
    x = 3 * torch.randn(n, hidden, dtype=dtype, device=DEVICE) + 1
    r = torch.randn(n, hidden, dtype=dtype, device=DEVICE)
    want = norm(x, r)
    got = fused(x, r)
    assert got.dtype == want.dtype and got.shape == want.shape
    # The mean and variance reduce in another order than torch's: a couple of units in the last place.
    eps = torch.finfo(dtype).eps * (2 if INTERPRETED_BF16 and dtype == torch.bfloat16 else 1)
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps)
    torch.testing.assert_close(fused(x), norm(x))  # no residual: the eager norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_rms_norm_reads_a_strided_view(dtype: torch.dtype) -> None:
    """Qwen3's q/k norms: [n, heads, head_dim] views of a fused qkv projection, normed per head."""
    torch.manual_seed(3)
    head_dim, heads, kv_heads, n = 32, 4, 2, 5
    norm = RMSNorm(head_dim, 1e-6, dtype, DEVICE)
    norm.weight.data = (1 + 0.1 * torch.randn(head_dim)).to(dtype).to(DEVICE)
    fused = _fused(norm)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    for view in (q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim)):
        assert not view.is_contiguous()
        got = fused(view)
        assert got.shape == view.shape
        _ulp_close(got, norm(view))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 1536, 1000])
def test_silu_and_mul(dtype: torch.dtype, d: int) -> None:
    torch.manual_seed(1)
    x = 3 * torch.randn(5, 2 * d, dtype=dtype, device=DEVICE)
    fused = _fused(SiluAndMul())
    assert type(fused) is FusedSiluAndMul
    _ulp_close(fused(x), SiluAndMul()(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64), (6, 1, 80)])
def test_rotary(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(2)
    rope = RotaryEmbedding(head_dim, RopeSettings(theta=10000.0), 4096, 4096, DEVICE)
    fused = _fused(rope)
    assert type(fused) is FusedRotaryEmbedding
    n = 6
    # q, k as the model makes them: views into one qkv projection output.
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 5, 17, 1000, 4095], device=DEVICE)
    cos_sin = rope.cos_sin(positions, dtype)
    got_q, got_k = fused(q, k, cos_sin)
    want_q, want_k = rope(q, k, cos_sin)
    # An element is a difference of two rounded products: bound its error by the inputs' scale.
    for got, want, x in ((got_q, want_q, q), (got_k, want_k, k)):
        scale = x.float().abs().amax(dim=-1, keepdim=True)
        tol = 2 * torch.finfo(dtype).eps * (2 if INTERPRETED_BF16 and dtype == torch.bfloat16 else 1) * scale
        assert ((got.float() - want.float()).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rotary_applies_the_per_head_norms(dtype: torch.dtype, gemma: bool) -> None:
    """Qwen3's q/k RMSNorms go into the rotary kernel (one launch, not three); Gemma's 1 + weight norm runs as
    its module first. Either way the result is the norms then the rotation, as eager computes them."""
    from kvik.layers.norm import GemmaRMSNorm

    torch.manual_seed(3)
    heads, kv_heads, head_dim, n = 8, 2, 64, 5
    rope = RotaryEmbedding(head_dim, RopeSettings(theta=1e6), 4096, 4096, DEVICE)
    norm_cls = GemmaRMSNorm if gemma else RMSNorm
    q_norm, k_norm = norm_cls(head_dim, 1e-6, dtype, DEVICE), norm_cls(head_dim, 1e-6, dtype, DEVICE)
    for norm in (q_norm, k_norm):
        norm.weight.data = (float(not gemma) + 0.2 * torch.randn(head_dim)).to(dtype).to(DEVICE)
    fused = _fused(rope)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE) * 3
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    cos_sin = rope.cos_sin(torch.tensor([0, 3, 70, 511, 4000], device=DEVICE), dtype)
    got_q, got_k = fused(q, k, cos_sin, q_norm, k_norm)
    want_q, want_k = rope(q, k, cos_sin, q_norm, k_norm)
    assert torch.equal(want_q, rope(q_norm(q), k_norm(k), cos_sin)[0])  # the core default: norms, then rotary
    # The normed values may differ by one unit (float32 sums in another order) before the rotation's products.
    for got, want in ((got_q, want_q), (got_k, want_k)):
        tol = 4 * torch.finfo(dtype).eps * (2 if INTERPRETED_BF16 and dtype == torch.bfloat16 else 1)
        assert ((got.float() - want.float()).abs() <= tol * 4).all()


def test_partial_rotary_falls_back_to_eager() -> None:
    rope = RotaryEmbedding(32, RopeSettings(theta=10000.0, partial_rotary_factor=0.5), 128, 128, DEVICE)
    fused = _fused(rope)
    q = torch.randn(3, 2, 32, device=DEVICE)
    k = torch.randn(3, 1, 32, device=DEVICE)
    cs = rope.cos_sin(torch.arange(3, device=DEVICE), torch.float32)
    for a, b in zip(fused(q, k, cs), rope(q, k, cs), strict=True):
        assert torch.equal(a, b)


def test_fuse_layers_swaps_only_exact_types() -> None:
    class MyNorm(RMSNorm):
        pass

    model = torch.nn.Sequential(RMSNorm(8), MyNorm(8), SiluAndMul(), torch.nn.Linear(2, 2))
    counts = fuse_layers(model)
    assert counts == {"FusedRMSNorm": 1, "FusedSiluAndMul": 1}
    assert type(model[1]) is MyNorm
