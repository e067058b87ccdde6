"""Deterministic mode's layers: results that do not depend on what else the batch holds.

A token row's numbers must be the same whether it runs alone, inside any batch, at any
position in it, or in any chunk of its prompt (``deterministic=True``). Three things break
that in the default layers, and this module replaces them on a built model
(:func:`make_batch_invariant`, a transform like quantization's):

* **Matmuls.** Kernels choose their tiling and reduction split by shape, so the order
  in which a row's products are summed changes with the number of rows ``M``. Here every
  linear layer and the LM head go through one ``matmul`` whose reduction order is fixed
  for all ``M``: on the CPU, :func:`blocked_linear` runs ``F.linear`` on row blocks of one
  fixed shape (a kernel called on one shape does the same arithmetic for each of its rows);
  on CUDA a Triton GEMM with one tile configuration and no split-K
  (:mod:`kvik_cuda.batch_invariant`).
* **Row reductions** (RMSNorm's mean of squares): on the CPU a reduction's threading and
  vector split depend on the tensor's shape, so they run on fixed-shape row blocks too.
* **Transcendental element-wise ops on the CPU** (``exp`` in SiLU and softmax, ``cos``/
  ``sin`` of rotary angles): PyTorch's CPU loops compute full SIMD vectors with a vector
  ``exp`` and the leftover tail (and each thread's chunk tail) with the scalar one, which
  can differ in the last bit, so an element's result depends on where it sits in the
  tensor. :func:`pointwise` applies such ops in fixed pieces that never leave a tail.
  (CUDA kernels run the same per-element code everywhere: no such effect.)

Everything else in the Llama-family forward is exact per element (adds, products,
gathers, ``sqrt``), hence position-independent. Modules this module does not know to be
invariant are refused (:func:`make_batch_invariant` names them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvik.layers.activation import SiluAndMul
from kvik.layers.embedding import LMHead, VocabEmbedding
from kvik.layers.linear import Linear
from kvik.layers.norm import RMSNorm
from kvik.layers.rotary import RotaryEmbedding
from kvik.quantization.unquantized import UnquantizedLinearMethod

# Rows per block for the CPU's fixed-shape calls. 32 is a multiple of every GEMM micro-kernel's
# row tile (so no block has a ragged edge) and keeps a decode step's wasted rows cheap.
ROW_BLOCK = 32
# Elements per call of a transcendental op on the CPU: a multiple of any SIMD loop's stride
# (2 vectors of up to 64 bytes = at most 64 elements), and below ATen's parallel grain size
# (32768), so each piece runs on one thread with no tail.
PIECE = 4096

# matmul(x [M, K], weight [N, K], bias [N] | None) -> [M, N] in x's dtype
Matmul = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _pad_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.shape[0] % block
    return x if pad == 0 else torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose every call has shape ``[ROW_BLOCK, K]``: each row's result is the same
    whatever ``M`` is (tests/core/layers/test_batch_invariant.py checks it bitwise)."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, weight.shape[0]))
    padded = _pad_rows(x.contiguous(), ROW_BLOCK)
    out = torch.cat([F.linear(block, weight, bias) for block in padded.split(ROW_BLOCK)])
    return out[:m]


def pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an element-wise ``fn``, computed in pieces of ``PIECE`` elements so every
    element goes through the same (vector) code path wherever it sits."""
    flat = x.contiguous().reshape(-1)
    n = flat.shape[0]
    if n == 0:
        return fn(x)
    pad = -n % PIECE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    out = torch.cat([fn(piece) for piece in flat.split(PIECE)])
    return out[:n].reshape(x.shape)


class InvariantLinearMethod(UnquantizedLinearMethod):
    """Dense weights (as :class:`UnquantizedLinearMethod` stores them) multiplied by a batch-invariant matmul."""

    def __init__(self, matmul: Matmul) -> None:
        self.matmul = matmul

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return self._mm(layer, x, None)

    def apply_with_bias(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self._mm(layer, x, bias)

    def _mm(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self.matmul(x.reshape(-1, x.shape[-1]), self.dequantize(layer), bias)
        return out.reshape(*lead, out.shape[-1])


class InvariantLMHead(LMHead):
    """The LM head through the batch-invariant matmul (``invariant_matmul`` set by the transform)."""

    invariant_matmul: Matmul

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self.invariant_matmul(hidden, self.head_weight, None).float()


class InvariantRMSNorm(RMSNorm):
    """RMSNorm on fixed-shape row blocks (CPU): the mean of squares is reduced the same way for every row."""

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        n = rows.shape[0]
        if n == 0:
            return x.clone()
        blocks = []
        for block in _pad_rows(rows.contiguous(), ROW_BLOCK).split(ROW_BLOCK):
            x32 = block.float()
            normed = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps)
            if x.dtype == torch.float32:
                blocks.append(normed * self.weight)
            else:
                blocks.append(self.weight * normed.to(x.dtype))
        return torch.cat(blocks)[:n].reshape(x.shape)


class InvariantSiluAndMul(SiluAndMul):
    """``silu(gate) * up`` with SiLU's ``exp`` applied in fixed pieces (CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return pointwise(F.silu, gate) * up


class InvariantRotaryEmbedding(RotaryEmbedding):
    """Rotary with ``cos``/``sin`` of the angles computed in fixed pieces (CPU)."""

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [n, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = pointwise(torch.cos, emb), pointwise(torch.sin, emb)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


@dataclass(frozen=True, slots=True)
class InvariantKernels:
    """What a platform runs in deterministic mode.

    ``matmul`` serves every linear layer and the LM head. ``layers`` maps a layer class
    to the class that makes it batch-invariant (itself when it already is); a leaf module
    of a class not in ``layers`` nor known to be exact (embeddings) is refused.
    """

    matmul: Matmul
    layers: dict[type[nn.Module], type[nn.Module]] = field(default_factory=dict)


def torch_kernels() -> InvariantKernels:
    """The generic torch implementation (CPU, and any device without its own)."""
    return InvariantKernels(
        matmul=blocked_linear,
        layers={
            RMSNorm: InvariantRMSNorm,
            SiluAndMul: InvariantSiluAndMul,
            RotaryEmbedding: InvariantRotaryEmbedding,
        },
    )


def _exact_leaf(module: nn.Module) -> bool:
    """Leaf modules whose forward is exact per element (gathers): invariant as they are."""
    from kvik.models.llama import MissingLayer

    return type(module) in (VocabEmbedding, MissingLayer)


def make_batch_invariant(model: nn.Module, kernels: InvariantKernels) -> dict[str, int]:
    """Switch ``model``'s layers to batch-invariant ones in place; return counts by kind.

    Raises ``ValueError`` naming every module it cannot make invariant (quantized
    linears, MoE experts, other norms and activations, foreign modelling code), before
    changing anything.
    """
    problems: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if type(module.quant_method) is not UnquantizedLinearMethod:
                problems.setdefault(
                    f"{module.quant_method.name} linear", f"{name} (weights kept packed; use quantized_weights='dequantize')"
                )
        elif isinstance(module, LMHead):
            if type(module) not in (LMHead, InvariantLMHead):  # a vocabulary-parallel head gathers over ranks
                problems.setdefault(type(module).__name__, name)
        elif type(module) in kernels.layers or _exact_leaf(module):
            continue
        elif not any(True for _ in module.children()):  # a leaf whose arithmetic this module does not know
            problems.setdefault(type(module).__name__, name)
    if problems:
        listed = "; ".join(f"{kind} (e.g. {where})" for kind, where in problems.items())
        raise ValueError(
            "deterministic=True cannot make these layers batch-invariant: "
            f"{listed}. It supports dense Llama-family models (Llama, Mistral, Qwen2, Qwen3, Phi-3) "
            "run by kvik's native modelling code; leave deterministic off for this model"
        )
    counts: dict[str, int] = {}

    def count(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1

    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method = InvariantLinearMethod(kernels.matmul)
            count("linear")
        elif isinstance(module, LMHead):
            module.__class__ = InvariantLMHead
            module.invariant_matmul = kernels.matmul  # type: ignore[assignment]
            count("lm_head")
        else:
            target = kernels.layers.get(type(module))
            if target is not None and target is not type(module):
                module.__class__ = target  # same state, one overridden method
                count(target.__name__)
    return counts


def describe(counts: dict[str, Any]) -> str:
    return ", ".join(f"{v} x {k}" for k, v in counts.items()) or "nothing"
