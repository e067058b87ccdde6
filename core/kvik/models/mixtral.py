"""Mixtral: Mistral's decoder with a sparse mixture of SiLU experts in place of the MLP.

Every layer routes each token to ``num_experts_per_tok`` of ``num_local_experts``
experts (softmax, top-k, renormalised to sum 1). Checkpoints name the block
``block_sparse_moe`` and the expert projections ``w1`` (gate), ``w3`` (up) and
``w2`` (down); :meth:`MixtralForCausalLM.sanitize` maps them onto
:class:`~kvik.layers.moe.SparseMoE`, which stacks the experts at load time.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from kvik.layers.moe import SparseMoE
from kvik.models.interface import ModelBuildContext
from kvik.models.llama import MistralForCausalLM

_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


def required(cfg: Any, *names: str) -> int:
    """The first of ``names`` the config sets, as a positive int; a ValueError naming them otherwise."""
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"the model config's {name} is {value!r}; it must be a positive integer")
            return value
    raise ValueError(f"the model config has no {' / '.join(names)}; a mixture-of-experts model needs it")


def check_dense(ctx: ModelBuildContext) -> None:
    if ctx.quant_method is not None:
        raise ValueError(
            f"{ctx.model_config.architecture}: quantized mixture-of-experts checkpoints are not supported yet "
            f"({ctx.model_config.quantization}); use an unquantized checkpoint"
        )


class MixtralForCausalLM(MistralForCausalLM):
    """Mistral attention (optionally windowed) + a top-k mixture of experts in every layer."""

    @classmethod
    def make_mlp(cls, ctx: ModelBuildContext, index: int) -> nn.Module:
        check_dense(ctx)
        cfg = ctx.model_config.hf_config
        return SparseMoE(
            cfg.hidden_size,
            num_experts=required(cfg, "num_local_experts"),
            top_k=required(cfg, "num_experts_per_tok"),
            intermediate_size=required(cfg, "intermediate_size"),
            renormalize=True,
            round_weights=False,  # HF's Mixtral scales by the float32 routing weights
            dtype=ctx.dtype,
            device=ctx.device,
        )

    @classmethod
    def sanitize(cls, name: str) -> str:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT_NAME.sub(lambda m: f".experts.{m.group(1)}.{_EXPERT_PROJ[m.group(2)]}.", name)
