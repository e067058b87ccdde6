"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with sparse mixture-of-experts layers.

Layer ``i`` is sparse unless listed in ``mlp_only_layers`` or off the
``decoder_sparse_step`` stride; dense layers use a plain MLP of
``intermediate_size``. Routing: softmax, top ``num_experts_per_tok``, and a
renormalisation to sum 1 only when ``norm_topk_prob`` is set.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kvik.layers.moe import SparseMoE
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import LlamaMLP
from kvik.models.mixtral import check_dense, required
from kvik.models.qwen3 import Qwen3ForCausalLM


def is_sparse_layer(cfg: Any, index: int) -> bool:
    """HF's rule for which Qwen-MoE layers route to experts."""
    num_experts = int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0)
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return index not in (getattr(cfg, "mlp_only_layers", None) or []) and num_experts > 0 and (index + 1) % step == 0


def sparse_moe(ctx: ModelBuildContext, shared_expert: nn.Module | None = None) -> SparseMoE:
    check_dense(ctx)
    cfg = ctx.model_config.hf_config
    return SparseMoE(
        cfg.hidden_size,
        num_experts=required(cfg, "num_experts", "num_local_experts"),
        top_k=required(cfg, "num_experts_per_tok"),
        intermediate_size=required(cfg, "moe_intermediate_size"),
        renormalize=bool(getattr(cfg, "norm_topk_prob", False)),
        dtype=ctx.dtype,
        device=ctx.device,
        shared_expert=shared_expert,
        shared_gate=shared_expert is not None,
    )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3 with :class:`~kvik.layers.moe.SparseMoE` feed-forward blocks (no shared expert)."""

    @classmethod
    def make_mlp(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        if is_sparse_layer(ctx.model_config.hf_config, index):
            return sparse_moe(ctx)
        return LlamaMLP(ctx, False)
