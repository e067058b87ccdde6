"""Phi-3 and Phi-4: Mistral's decoder with checkpoints that ship q/k/v and gate/up already fused.

``self_attn.qkv_proj.weight`` ([q + 2 * kv, hidden]) and ``mlp.gate_up_proj.weight``
([2 * intermediate, hidden], gate rows first) load whole into kvik's merged
:class:`~kvik.layers.linear.Linear` layers, which are fused the same way. Long-context
variants use LongRoPE (``rope_scaling.type`` ``longrope`` / ``su``, see
:mod:`kvik.layers.rotary`); Phi-4-mini rotates part of each head
(``partial_rotary_factor``). A ``sliding_window`` applies to every layer.
"""

from __future__ import annotations

from typing import Any

from kvik.models.llama import MistralForCausalLM


class Phi3ForCausalLM(MistralForCausalLM):
    """Phi-3 / Phi-3.5 / Phi-4 (``Phi3ForCausalLM`` checkpoints)."""

    @classmethod
    def qkv_bias(cls, cfg: Any) -> bool:
        return False

    @classmethod
    def o_bias(cls, cfg: Any) -> bool:
        return False
