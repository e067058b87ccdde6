"""Rotary position embeddings (neox / Hugging Face "rotate_half" layout) and HF rope settings.

The settings themselves are read by :mod:`kvik.layers.rope_settings`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kvik.attention.backend import RotaryInputs
from kvik.layers.norm import RMSNorm
from kvik.layers.rope_settings import SUPPORTED_ROPE_TYPES, RopeSettings, rope_max_len, rope_settings

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "RopeSettings",
    "RotaryEmbedding",
    "compute_inv_freq",
    "rope_max_len",
    "rope_settings",
]


def compute_inv_freq(rope: RopeSettings, rotary_dim: int, max_position: int, max_model_len: int) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` float32, as HF computes them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base = rope.theta
    factor = float(rope.params.get("factor", 1.0))
    if rope.rope_type == "dynamic" and max_model_len > max_position:
        # HF recomputes the base from the longest sequence in each forward; a paged
        # cache keeps keys rotated at write time, so we fix the base for the longest
        # context this engine serves (as vLLM does). Within max_position_embeddings
        # the frequencies are the original ones, exactly like HF.
        base = base * ((factor * max_model_len / max_position) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope.params)
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, rope, rotary_dim, max_position)
    elif rope.rope_type == "longrope":
        inv_freq = inv_freq / _longrope_factors(rope, rotary_dim, max_model_len)
    return inv_freq


def _longrope_factors(rope: RopeSettings, rotary_dim: int, max_model_len: int) -> torch.Tensor:
    """LongRoPE's per-frequency divisors: ``long_factor`` when the engine serves contexts past the
    pre-training length, else ``short_factor``.

    HF picks per forward from the current sequence length; a paged cache keeps keys
    rotated at write time, so the choice is fixed for the longest context this
    engine serves (as for ``dynamic``). Within ``original_max_position_embeddings``
    this is exactly HF's short-factor rope.
    """
    original = int(rope.params["original_max_position_embeddings"])
    key = "long_factor" if max_model_len > original else "short_factor"
    factors = [float(f) for f in rope.params[key]]
    if len(factors) != rotary_dim // 2:
        raise ValueError(
            f"rope_scaling.{key} has {len(factors)} entries; this model rotates {rotary_dim} channels, "
            f"so it needs {rotary_dim // 2}"
        )
    return torch.tensor(factors, dtype=torch.float32)


def _yarn_factor(rope: RopeSettings, max_position: int) -> float:
    params = rope.params
    return float(params.get("factor") or max_position / params["original_max_position_embeddings"])


def rope_attention_factor(rope: RopeSettings, max_position: int) -> float:
    """The scale YaRN and LongRoPE apply to cos and sin (1.0 for every other rope type)."""
    params = rope.params
    if rope.rope_type == "longrope":
        if params.get("attention_factor") is not None:
            return float(params["attention_factor"])
        original = float(params["original_max_position_embeddings"])
        scale = float(params.get("factor") or max_position / original)
        return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
    if rope.rope_type != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = _yarn_factor(rope, max_position)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _yarn_inv_freq(inv_freq: torch.Tensor, rope: RopeSettings, dim: int, max_position: int) -> torch.Tensor:
    # YaRN: interpolate (divide by factor) the low frequencies, keep the high ones,
    # ramp linearly between the dimensions that rotate beta_slow..beta_fast times
    # over the trained context.
    params = rope.params
    factor = _yarn_factor(rope, max_position)
    original = float(params.get("original_max_position_embeddings") or max_position)
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the
    # band between them interpolated smoothly.
    factor = float(params["factor"])
    low_freq_factor = float(params.get("low_freq_factor", 1.0))
    high_freq_factor = float(params.get("high_freq_factor", 4.0))
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` channels of q and k by position.

    ``cos_sin(positions)`` is computed once per step (shared by all layers);
    ``forward`` applies it. Angles are computed in float32 from the positions
    directly, so any position works without a precomputed table.
    """

    def __init__(
        self,
        head_dim: int,
        rope: RopeSettings,
        max_position: int,
        max_model_len: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor  # [rotary_dim // 2] float32 buffer
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq = compute_inv_freq(rope, self.rotary_dim, max_position, max_model_len or max_position)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.attention_factor = rope_attention_factor(rope, max_position)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [n] -> (cos, sin), each [n, 1, rotary_dim] in ``dtype`` (broadcast over heads)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [n, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, heads, head_dim], k [n, kv_heads, head_dim] -> rotated (same shapes).

        ``q_norm`` / ``k_norm``: per-head norms applied first (Qwen3, Gemma 3), passed here rather than called
        by the model so that a platform can norm and rotate in one kernel.
        """
        q, k = self.normed(q, k, q_norm, k_norm)
        cos, sin = cos_sin
        return self._rotate_part(q, cos, sin), self._rotate_part(k, cos, sin)

    def kernel_inputs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> RotaryInputs[torch.Tensor] | None:
        """What :meth:`forward` does, as inputs for an attention backend that rotates q and k itself
        (:meth:`kvik.attention.AttentionBackend.forward_rotary`); None where that description cannot say it:
        partial rotary, cos/sin in another dtype than q, or a norm other than a plain :class:`RMSNorm`."""
        cos, sin = cos_sin
        if self.rotary_dim != self.head_dim or self.head_dim % 2 or cos.dtype != q.dtype:
            return None
        q_weight, k_weight = plain_norm_weight(q_norm, q), plain_norm_weight(k_norm, k)
        if (q_norm is not None and q_weight is None) or (k_norm is not None and k_weight is None):
            return None
        n = q.shape[0]
        return RotaryInputs(
            cos=cos.reshape(n, -1),
            sin=sin.reshape(n, -1),
            q_norm_weight=q_weight,
            k_norm_weight=k_weight,
            q_norm_eps=float(getattr(q_norm, "eps", 0.0)),
            k_norm_eps=float(getattr(k_norm, "eps", 0.0)),
        )

    @staticmethod
    def normed(
        q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module | None, k_norm: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` and ``k`` through their per-head norms, where given (what a platform's rotary does itself
        for norms it cannot fuse)."""
        return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k))

    def _rotate_part(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim < self.head_dim:
            rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
            return torch.cat((_rotate(rot, cos, sin), rest), dim=-1)
        return _rotate(x, cos, sin)


def plain_norm_weight(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
    """``norm``'s weight when a kernel may apply ``norm`` to the heads ``x`` itself, else None: an RMSNorm that
    computes RMSNorm's own formula (not Gemma's ``1 + weight``, nor deterministic mode's blocked reduction; a
    fused subclass that only replaces ``forward`` qualifies) over the head dim, with ``x``'s dtype (what the
    eager rounding steps assume)."""
    if not isinstance(norm, RMSNorm) or type(norm)._norm is not RMSNorm._norm:
        return None
    weight = norm.weight
    return weight if weight.shape == (x.shape[-1],) and weight.dtype == x.dtype else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
