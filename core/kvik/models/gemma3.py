"""Gemma 3 (text): Gemma 2's layer plus per-head q/k norms, and local layers with their own rope base.

Five sliding-window layers to one global one (``layer_types``, or
``sliding_window_pattern`` in older configs); sliding layers rotate with
``rope_local_base_freq`` (or ``rope_parameters["sliding_attention"]``), global
ones with the global settings (which may be scaled, e.g. linear x8).
Soft-capping is off unless the config sets it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from kvik.layers.norm import GemmaRMSNorm
from kvik.layers.rope_settings import RopeSettings
from kvik.layers.rotary import rope_settings
from kvik.models.gemma2 import Gemma2ForCausalLM
from kvik.models.interface import ModelBuildContext


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text decoder (``Gemma3ForCausalLM`` checkpoints)."""

    def __init__(self, ctx: ModelBuildContext) -> None:
        if getattr(ctx.model_config.hf_config, "use_bidirectional_attention", False):
            raise ValueError(
                "Gemma3ForCausalLM: use_bidirectional_attention=True (an embedding model) is not a causal LM; "
                "kvik generates only with causal attention"
            )
        super().__init__(ctx)

    @classmethod
    def is_sliding_by_default(cls, cfg: Any, index: int) -> bool:
        return bool((index + 1) % int(getattr(cfg, "sliding_window_pattern", 6) or 6))

    @classmethod
    def local_rope(cls, cfg: Any) -> RopeSettings | None:
        params = getattr(cfg, "rope_parameters", None)
        if isinstance(params, dict) and "sliding_attention" in params:
            return rope_settings(cfg, "sliding_attention")
        base = getattr(cfg, "rope_local_base_freq", None)  # transformers < 5
        return replace(rope_settings(cfg), rope_type="default", theta=float(base or 10000.0), params={})

    @classmethod
    def qk_norm(cls, cfg: Any, ctx: ModelBuildContext) -> Any:
        return partial(GemmaRMSNorm, eps=getattr(cfg, "rms_norm_eps", 1e-6), dtype=ctx.dtype, device=ctx.device)
