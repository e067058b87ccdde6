"""Mixture-of-experts feed-forward: router, top-k routing, and experts stacked at load time.

:class:`MoEExperts` holds every expert's weights in two stacked tensors
(``w13``: gate and up rows, ``w2``: down) filled expert by expert from Hugging
Face checkpoints (``experts.{e}.gate_proj.weight`` ...). Its ``forward`` is the
torch reference: one pair of matmuls per expert that received tokens. Platforms
replace it with a grouped-GEMM kernel by swapping the module's class for a
subclass that overrides ``forward`` (the kvik-cuda platform's ``kvik_cuda.moe``),
the same transform its fused RMSNorm uses; the core never imports a platform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvik.layers.linear import Linear

# checkpoint projection name -> (stacked tensor, row shard: 0 gate / 1 up, None: whole)
_PROJ = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}


def route(
    router_logits: torch.Tensor,  # [n, num_experts]
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), keep the ``top_k`` best, optionally renormalise to sum 1.

    Returns ``(weights [n, top_k] float32, ids [n, top_k] int64)``.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEExperts(nn.Module):
    """``num_experts`` SiLU-gated MLPs with stacked weights.

    ``w13``: [E, 2 * intermediate, hidden] (gate rows, then up rows);
    ``w2``: [E, hidden, intermediate].
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device), requires_grad=False
        )
        self._loaded: set[str] = set()

    # -- loading ----------------------------------------------------------------
    def load_checkpoint_weight(self, rest: str, value: torch.Tensor, full_name: str) -> bool:
        """Load ``{expert}.{gate_proj|up_proj|down_proj}.weight`` (``rest``); False if not ours."""
        parts = rest.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in _PROJ or parts[2] != "weight":
            return False
        expert = int(parts[0])
        if expert >= self.num_experts:
            raise ValueError(f"{full_name}: expert {expert} does not exist; the config has {self.num_experts} experts")
        stacked, shard = _PROJ[parts[1]]
        target = getattr(self, stacked).data[expert]
        if shard is not None:
            target = target[shard * self.intermediate_size : (shard + 1) * self.intermediate_size]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{full_name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value.to(target.dtype))
        self._loaded.add(f"{expert}.{parts[1]}")
        return True

    def missing_checkpoint_weights(self) -> list[str]:
        return [
            f"{e}.{proj}.weight" for e in range(self.num_experts) for proj in _PROJ if f"{e}.{proj}" not in self._loaded
        ]

    # -- running ------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,  # [n, hidden]
        topk_weights: torch.Tensor,  # [n, top_k] float32 or x.dtype (see SparseMoE.round_weights)
        topk_ids: torch.Tensor,  # [n, top_k] int64
    ) -> torch.Tensor:  # [n, hidden]
        """Reference: each expert runs on the tokens routed to it; outputs are summed by weight.

        Each expert's output is scaled in the weights' dtype (promoted), then rounded to
        ``x.dtype`` and summed in it, as HF does.
        """
        out = torch.zeros_like(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._dense(x, topk_weights, topk_ids, out)
        for expert in torch.unique(topk_ids).tolist():
            token, slot = torch.where(topk_ids == expert)
            gate, up = F.linear(x[token], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(out.dtype))
        return out

    def _dense(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """Every expert on every token, weighted (0 where not routed): no host sync, so a CUDA graph
        can capture it. E times the work, for platforms that capture graphs without a fused MoE kernel."""
        for expert in range(self.num_experts):
            weight = (topk_weights * (topk_ids == expert)).sum(dim=-1, keepdim=True)  # [n, 1]
            gate, up = F.linear(x, self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            out += (y * weight).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


class SparseMoE(nn.Module):
    """Router + top-k experts, plus an optional always-on shared expert.

    ``shared_expert`` (any ``[n, hidden] -> [n, hidden]`` module, e.g. a dense MLP)
    is added to the routed output, scaled by ``sigmoid(shared_expert_gate(x))``
    when ``shared_gate`` is set (Qwen2-MoE's layout). ``round_weights`` rounds the routing
    weights to the activation dtype before they scale the experts' outputs (Qwen's HF code
    does; Mixtral's scales by the float32 weights).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        shared_expert: nn.Module | None = None,
        shared_gate: bool = False,
        round_weights: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"the model config routes each token to {top_k} of {num_experts} experts; need 0 < k <= E")
        self.top_k = top_k
        self.renormalize = renormalize
        self.round_weights = round_weights
        self.gate = Linear(hidden_size, num_experts, dtype=dtype, device=device)  # the router
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size, dtype, device)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1, dtype=dtype, device=device) if shared_gate else None

    def route(self, router_logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [n, top_k], ids [n, top_k] int64)``: :func:`route`, the weights rounded to ``dtype``
        (the activations') when ``round_weights``, else float32. Platforms override it with one kernel."""
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        return (weights.to(dtype) if self.round_weights else weights), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, hidden]
        weights, ids = self.route(self.gate(x), x.dtype)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
