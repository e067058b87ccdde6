"""Fused Triton kernels for the Llama family's elementwise layers, applied as a model transform.

Eager PyTorch runs RMSNorm as ~9 kernels, rotary as ~10 and SiLU-and-mul as 2,
each a full pass over its tensor; at decode batch sizes every one of them is a
few microseconds of launch-bound GPU time (~30 per layer, ~1,000 per 8B step).
Here each layer is one kernel.

:func:`fuse_layers` swaps the *class* of matching modules of a built model
(``kvik.layers`` RMSNorm, SiluAndMul, RotaryEmbedding, Linear and LMHead (one-row products through
:mod:`kvik_cuda.gemv`), the Llama family's MLP (its one-row gate/up product and SiLU in one GEMV), and
MoEExperts whose replacement lives in :mod:`kvik_cuda.moe`; exact types only) for a
subclass whose ``forward`` launches the kernel: weights, buffers and the model
code stay as they are. The kernels follow the eager rounding steps (16-bit
products and sums rounded where torch rounds them); the residual add is
bit-exact, and outputs may differ by one unit in the last place where the float32
reduction order or ``exp`` differ, or where the compiler keeps a product in
float32 (tests/platforms/cuda/test_fused.py). Eager and CUDA-graph steps both
use these kernels, so graphs on/off stay identical.
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl
from kvik.layers.activation import SiluAndMul
from kvik.layers.embedding import LMHead
from kvik.layers.linear import Linear
from kvik.layers.moe import MoEExperts, SparseMoE
from kvik.layers.norm import AddLayerNorm, RMSNorm
from kvik.layers.rotary import RotaryEmbedding, plain_norm_weight
from kvik.models.llama import LlamaMLP
from kvik.quantization.unquantized import UnquantizedLinearMethod
from torch import nn

from kvik_cuda.act_quant import silu_and_mul_quantized
from kvik_cuda.gemv import dense_gemv
from kvik_cuda.moe import TritonMoEExperts, TritonSparseMoE
from kvik_cuda.silu import silu_and_mul


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_rows,
    n_cols,
    eps,
    heads,  # rows per token: 1, or the head count of a per-head norm over [n, heads, n_cols]
    stride_h,  # the input's head stride (per-head norms read q/k views of a fused projection)
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (offs < n_cols)[None, :]
    src = (rows // heads) * stride_x + (rows % heads) * stride_h
    x = tl.load(x_ptr + src[:, None] + offs[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_r + offs[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the add rounds to the input dtype
        tl.store(res_out_ptr + rows[:, None] * stride_ro + offs[None, :], x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, 1) / n_cols + eps)
    normed = (x32 * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :], (w[None, :] * normed).to(out_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, stride_x, stride_r, stride_o, n_rows, n_cols, eps,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    col_ok = offs < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + rows[:, None] * stride_r + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager add rounds to the input dtype
    mean = tl.sum(h, 1) / n_cols
    centered = tl.where(col_ok[None, :], h - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(centered * centered, 1) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, silu_and_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    w_ptr,  # [2 * HALF] per-head norm weight (read when NORM)
    eps,
    tok,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    cos1,
    cos2,
    sin1,
    sin2,
    num_heads,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    NORM: tl.constexpr,
):
    """out = x*cos + rotate_half(x)*sin for every head of one token, rounding each product like eager; with
    NORM, each head is first RMS-normalised (``_rms_norm_kernel``'s steps: x * rstd rounded, times the weight,
    rounded), so Qwen3's per-head q/k norms cost no launch of their own."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (d < HALF)
    src = x_ptr + tok * stride_xt + h * stride_xh + d
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    ty = x1.dtype
    if NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = (w1 * (f1 * rstd).to(ty).to(tl.float32)).to(ty)
        x2 = (w2 * (f2 * rstd).to(ty).to(tl.float32)).to(ty)
    a1 = (x1.to(tl.float32) * cos1).to(ty).to(tl.float32)
    b1 = (-x2.to(tl.float32) * sin1).to(ty).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos2).to(ty).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin2).to(ty).to(tl.float32)
    dst = out_ptr + tok * stride_ot + h * stride_oh + d
    tl.store(dst, (a1 + b1).to(ty), mask=mask)
    tl.store(dst + HALF, (a2 + b2).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    qw_ptr,
    kw_ptr,
    q_eps,
    k_eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    NORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dm = d < HALF
    cos1 = tl.load(cos_ptr + tok * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + tok * stride_ct + HALF + d, mask=dm, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + tok * stride_st + d, mask=dm, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + tok * stride_st + HALF + d, mask=dm, other=0.0).to(tl.float32)
    # Outputs are contiguous [n, heads, 2 * HALF].
    _rotate_heads(q_ptr, q_out_ptr, qw_ptr, q_eps, tok, stride_qt, stride_qh, num_heads * 2 * HALF, 2 * HALF,
                  cos1, cos2, sin1, sin2, num_heads, Q_HEADS_PAD, HALF, HALF_PAD, NORM)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, kw_ptr, k_eps, tok, stride_kt, stride_kh, num_kv_heads * 2 * HALF, 2 * HALF,
                  cos1, cos2, sin1, sin2, num_kv_heads, K_HEADS_PAD, HALF, HALF_PAD, NORM)  # fmt: skip


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _rows_per_program(block: int) -> int:
    """Rows a norm program takes: a fixed function of the row width (never of the batch, so a row's
    reduction is the same in any batch); ~2K elements each, so a prefill's per-head norms (16 x 32K
    rows of 128) are not a million one-warp programs."""
    return max(1, min(16, 2048 // block))


class FusedRMSNorm(RMSNorm):
    """RMSNorm (with the optional residual add) in one kernel; also per head over a strided
    ``[n, heads, head_dim]`` view (Qwen3's q/k norms); a program takes several rows when they are short."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        per_head = x.dim() == 3 and residual is None  # Qwen3's q and k norms: [n, heads, head_dim]
        if (x.dim() != 2 and not per_head) or x.stride(-1) != 1 or self.weight.dtype != x.dtype or x.shape[0] == 0:
            return super().forward(x, residual)
        h = x.shape[-1]
        heads = x.shape[1] if per_head else 1
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous: row r at r * h
        block = _pow2(h)
        rows = _rows_per_program(block)
        warps = 8 if block >= 4096 else (4 if block * rows >= 256 else 1)
        n_rows = x.shape[0] * heads
        grid = (triton.cdiv(n_rows, rows),)
        if residual is None:
            _rms_norm_kernel[grid](
                x,
                x,
                self.weight,
                out,
                out,
                x.stride(0),
                0,
                h,
                0,
                n_rows,
                h,
                self.eps,
                heads,
                x.stride(1) if per_head else 0,
                HAS_RESIDUAL=False,
                ROWS=rows,
                BLOCK=block,
                num_warps=warps,
            )
            return out
        residual = residual.contiguous()
        res_out = torch.empty_like(x)
        _rms_norm_kernel[grid](
            x,
            residual,
            self.weight,
            out,
            res_out,
            x.stride(0),
            residual.stride(0),
            out.stride(0),
            res_out.stride(0),
            n_rows,
            h,
            self.eps,
            1,
            0,
            HAS_RESIDUAL=True,
            ROWS=rows,
            BLOCK=block,
            num_warps=warps,
        )
        return out, res_out


class FusedAddLayerNorm(AddLayerNorm):
    """``LayerNorm(x + residual)`` in one kernel (BERT's sublayer outputs: an add and a norm eagerly,
    each a full pass over the activations)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        usable = (
            residual is not None
            and x.dim() == 2
            and x.shape == residual.shape
            and x.stride(-1) == 1
            and residual.stride(-1) == 1
            and x.shape[0] > 0
            and len(self.normalized_shape) == 1
            and self.weight is not None
            and self.bias is not None
            and self.weight.dtype == x.dtype
        )
        if not usable:
            return super().forward(x, residual)
        assert residual is not None
        n, h = x.shape
        out = torch.empty((n, h), dtype=x.dtype, device=x.device)
        block = _pow2(h)
        rows = _rows_per_program(block)
        _add_layer_norm_kernel[(triton.cdiv(n, rows),)](
            x, residual, self.weight, self.bias, out, x.stride(0), residual.stride(0), out.stride(0), n, h, self.eps,
            ROWS=rows, BLOCK=block, num_warps=8 if block >= 4096 else 4,
        )  # fmt: skip
        return out


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.stride(-1) != 1 or x.shape[0] == 0:
            return super().forward(x)
        n, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((n, d), dtype=x.dtype, device=x.device)
        block = min(1024, _pow2(d))
        _silu_and_mul_kernel[(n, triton.cdiv(d, block))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=block, num_warps=4
        )
        return out


class FusedRotaryEmbedding(RotaryEmbedding):
    """Rotates q and k of each token in one kernel (full-width rotary only; else eager), applying per-head
    RMSNorms (Qwen3's q/k norms) in the same kernel when they are plain ``RMSNorm`` modules."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin  # [n, 1, head_dim]
        n = q.shape[0]
        usable = (
            self.rotary_dim == self.head_dim
            and self.head_dim % 2 == 0
            and q.stride(-1) == 1
            and k.stride(-1) == 1
            and cos.dtype == q.dtype
            and n > 0
        )
        if not usable:
            return super().forward(q, k, cos_sin, q_norm, k_norm)
        q_weight, k_weight = plain_norm_weight(q_norm, q), plain_norm_weight(k_norm, k)
        norm = q_weight is not None and k_weight is not None
        if not norm:  # a norm the kernel does not do (Gemma's 1 + weight), or none: run it as a module first
            q, k = self.normed(q, k, q_norm, k_norm)
        cos, sin = cos.reshape(n, -1), sin.reshape(n, -1)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        half = self.head_dim // 2
        _rotary_kernel[(n,)](
            q, k, cos, sin, q_out, k_out,
            q_weight if norm else q, k_weight if norm else k,
            q_norm.eps if norm else 0.0, k_norm.eps if norm else 0.0,  # type: ignore[union-attr]
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q.shape[1], k.shape[1],
            HALF=half, HALF_PAD=_pow2(half), Q_HEADS_PAD=_pow2(q.shape[1]), K_HEADS_PAD=_pow2(k.shape[1]),
            NORM=norm, num_warps=4,
        )  # fmt: skip
        return q_out, k_out


def _one_row_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is a one-row product of 16-bit tensors that :func:`dense_gemv` runs (on CUDA; on
    the CPU only under the interpreter, in tests, like every fused layer here)."""
    return (
        x.numel() == x.shape[-1]
        and x.dtype == weight.dtype
        and weight.dtype in (torch.bfloat16, torch.float16)
        and weight.stride(-1) == 1
    )


class FusedLinear(Linear):
    """Dense 16-bit projections at one row (batch-1 decode) through :func:`kvik_cuda.gemv.dense_gemv`, which
    reads the weight closer to HBM bandwidth than cuBLAS does at one row; every other case as before
    (quantized methods, batch-invariant mode's method subclass, biases, several rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and type(self.quant_method) is UnquantizedLinearMethod:
            weight = cast(torch.Tensor, self.weight)
            if _one_row_gemv(x, weight):
                return dense_gemv(x, weight)
        return super().forward(x)


class FusedLlamaMLP(LlamaMLP):
    """At one row, ``silu(gate) * up`` comes out of the gate/up GEMV itself (:func:`dense_gemv`'s ``gated``
    form): a program sums a gate row and its up row, then applies the activation, which saves the SiLU
    kernel's launch per layer with the same bits. Where the down projection quantizes its input rows
    first (a W8A8 method's :meth:`~kvik.quantization.base.QuantizationMethod.input_row_quantization`), the
    SiLU-and-mul kernel writes those codes itself (:mod:`kvik_cuda.act_quant`). Everything else (another
    activation, LoRA or tensor-parallel projections, weight-only methods) as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.gate_up_proj
        silu = type(self.act) in (SiluAndMul, FusedSiluAndMul)
        if silu and type(proj) is FusedLinear and proj.bias is None:
            weight = cast(torch.Tensor, proj.weight)
            if type(proj.quant_method) is UnquantizedLinearMethod and _one_row_gemv(x, weight):
                return self.down_proj(dense_gemv(x, weight, gated=True))
        down = self.down_proj
        if silu and type(down) in (Linear, FusedLinear) and down.bias is None:
            spec = down.quant_method.input_row_quantization(down, x.numel() // x.shape[-1])
            if spec is not None:
                gate_up = proj(x)
                quantized = silu_and_mul_quantized(gate_up.reshape(-1, gate_up.shape[-1]), spec)
                if quantized is not None:
                    y = down.quant_method.apply_quantized_rows(down, *quantized, gate_up.dtype)
                    return y.reshape(*x.shape[:-1], down.output_size)
                return down(self.act(gate_up))
        return super().forward(x)


class FusedLMHead(LMHead):
    """The one-row logits through :func:`dense_gemv` (the 8B head: 239 µs against cuBLAS's 282 on the H200)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head_weight
        if self.packed_matmul is None and _one_row_gemv(hidden, weight):
            return dense_gemv(hidden, weight).float()
        return super().forward(hidden)


_FUSED: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: FusedRMSNorm,
    AddLayerNorm: FusedAddLayerNorm,
    SiluAndMul: FusedSiluAndMul,
    RotaryEmbedding: FusedRotaryEmbedding,
    MoEExperts: TritonMoEExperts,  # grouped-GEMM experts (kvik_cuda.moe)
    SparseMoE: TritonSparseMoE,  # one routing kernel
    Linear: FusedLinear,  # one-row dense GEMV (kvik_cuda.gemv)
    LlamaMLP: FusedLlamaMLP,  # the one-row gate/up GEMV applies SiLU itself
    LMHead: FusedLMHead,
}


def fuse_layers(model: nn.Module) -> dict[str, int]:
    """Switch matching modules of ``model`` to their fused subclasses in place; return counts by class."""
    counts: dict[str, int] = {}
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused  # same state, one overridden forward
            counts[fused.__name__] = counts.get(fused.__name__, 0) + 1
    return counts
