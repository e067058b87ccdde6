"""LoRA as a transform on a built model: projections get per-slot adapter weights.

:func:`wrap_model` swaps the class of every adaptable :class:`~kvik.layers.linear.Linear`
(attention q/k/v/o, MLP gate/up/down; exact names) for :class:`LoRALinear`, which
adds the batched delta of :mod:`kvik.lora.compute` to the base output. The base
weights, quantization method and model code are untouched. All wrapped layers
share one :class:`LoRAState`: the per-token slot indices of the step (a
persistent device buffer the runner fills before each forward, so CUDA graphs
replay over whatever it holds) and the kernel that computes the delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kvik.layers.linear import Linear
from kvik.lora.compute import AddLoRA, add_lora_reference

# A fused projection and the PEFT module names of its shards, in shard order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PLAIN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


@dataclass(slots=True)
class LoRAState:
    """What every wrapped layer reads in a step."""

    token_slots: torch.Tensor  # [max_tokens] int64: slot of each token row, -1 = base model
    add_lora: AddLoRA = add_lora_reference
    # Called by the runner once per step with token_slots[:T], after writing it and before the
    # forward: what every projection of the step shares is computed here once, into buffers a
    # captured graph reads (the CUDA kernels' tile map). None: the kernel needs nothing per step.
    prepare_step: Callable[[torch.Tensor], None] | None = None
    # False: no row of this step has an adapter, skip the delta (eager steps only; a captured
    # graph always contains it and computes zeros for -1 rows).
    active: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """Where a PEFT module's weights go: a wrapped layer, and its shard (None: every shard)."""

    layer: LoRALinear
    shard: int | None
    in_features: int
    out_features: int


class LoRALinear(Linear):
    """A :class:`Linear` plus ``lora_a`` [L, S*R, in] and ``lora_b`` [L, out, R] slot weights."""

    lora_state: LoRAState
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_shard_starts: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        state = self.lora_state
        if state.active:
            state.add_lora(y, x, self.lora_a, self.lora_b, state.token_slots[: x.shape[0]], self.lora_shard_starts)
        return y


@dataclass(slots=True)
class WrappedModel:
    """The result of :func:`wrap_model`."""

    state: LoRAState
    layers: list[LoRALinear] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)  # PEFT module path -> target


def wrap_model(
    model: nn.Module,
    max_loras: int,
    max_rank: int,
    max_tokens: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> WrappedModel:
    """Wrap ``model``'s adaptable projections (in place); slot weights start at zero.

    The slots live on the parameters' device in their dtype unless ``device`` / ``dtype`` say otherwise
    (benchmarks give meta-device base layers real slots).
    """
    sample = next(model.parameters())
    device, dtype = device or sample.device, dtype or sample.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    state = LoRAState(torch.full((max_tokens,), -1, dtype=torch.int64, device=device))
    wrapped = WrappedModel(state)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is not Linear or leaf not in PLAIN:
            continue
        parent = name[: -len(leaf)]
        shards = FUSED.get(leaf, ())
        num_shards = len(module.output_sizes) if len(shards) == len(module.output_sizes) else 1
        module.__class__ = LoRALinear
        assert isinstance(module, LoRALinear)
        module.lora_state = state
        module.register_buffer(
            "lora_a", torch.zeros(max_loras, num_shards * max_rank, module.input_size, dtype=dtype, device=device),
            persistent=False,
        )  # fmt: skip
        module.register_buffer(
            "lora_b", torch.zeros(max_loras, module.output_size, max_rank, dtype=dtype, device=device), persistent=False
        )
        starts = [0]
        for size in module.output_sizes[:-1]:
            starts.append(starts[-1] + size)
        module.lora_shard_starts = tuple(starts) if num_shards > 1 else (0,)
        wrapped.layers.append(module)
        wrapped.targets[name] = Target(module, None, module.input_size, module.output_size)
        if num_shards > 1:
            for k, sub in enumerate(shards):
                wrapped.targets[parent + sub] = Target(module, k, module.input_size, module.output_sizes[k])
    if not wrapped.layers:
        raise ValueError(
            f"{type(model).__name__} has no projection LoRA can adapt (q/k/v/o, gate/up/down as plain linear layers)"
        )
    return wrapped


def write_slot(wrapped: WrappedModel, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fill ``slot`` of every wrapped layer with one adapter's (A, scaled B); unadapted layers get zeros.

    The copies are stream-ordered after the work already queued, so a step in flight that
    still reads this slot's old adapter is not disturbed.
    """
    for layer in wrapped.layers:
        layer.lora_a[slot].zero_()
        layer.lora_b[slot].zero_()
    for module, (a, b) in weights.items():
        target = wrapped.targets[module]
        layer, rank = target.layer, a.shape[0]
        max_rank = layer.lora_b.shape[2]
        if target.shard is None:  # the whole layer: every shard's rank block gets A, B covers all rows
            for k in range(len(layer.lora_shard_starts)):
                layer.lora_a[slot, k * max_rank : k * max_rank + rank].copy_(a, non_blocking=True)
            layer.lora_b[slot, :, :rank].copy_(b, non_blocking=True)
        else:
            k = target.shard
            start = layer.lora_shard_starts[k]
            layer.lora_a[slot, k * max_rank : k * max_rank + rank].copy_(a, non_blocking=True)
            layer.lora_b[slot, start : start + b.shape[0], :rank].copy_(b, non_blocking=True)
