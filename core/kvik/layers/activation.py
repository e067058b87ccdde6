"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` (the merged gate_up projection's output).

    ``x``: [..., 2 * d] -> [..., d].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """GeGLU: ``gelu_tanh(gate) * up`` for ``x = [gate | up]`` (Gemma's ``gelu_pytorch_tanh``).

    ``x``: [..., 2 * d] -> [..., d].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
