"""``silu(gate) * up`` with the eager modules' rounding, for every kernel that applies it (the SiLU-and-mul
kernel, the one-row gate/up GEMV), so that they give the same bits by construction."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def silu_and_mul(gate, up, ty: tl.constexpr):
    """``gate`` and ``up`` as float32 values of dtype ``ty`` (already rounded to it): silu rounded to ``ty`` where
    ``F.silu`` rounds, then the product rounded to ``ty``."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
    return (silu * up).to(ty)
