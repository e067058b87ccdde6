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
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvik.layers.linear import Linear
from kvik.lora.compute import AddLoRA, ProjectLoRA, add_lora_reference

if TYPE_CHECKING:
    from kvik.lora.host import HostAdapter

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
    # The whole projection, when a platform can overlap the delta with the base matmul (CUDA: the shrink
    # on a side stream beside it): project(x, a, b, slots, shard_starts, base) returns base(x) + delta.
    # None: base(x), then add_lora.
    project: ProjectLoRA | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a PEFT module's weights go: a wrapped layer, and its shard (None: every shard)."""

    layer: LoRALinear
    shard: int | None
    in_features: int
    out_features: int
    group: int  # the layer's SlotGroup in WrappedModel.groups
    index: int  # the layer's place in that group


@dataclass(slots=True)
class SlotGroup:
    """The slot weights of same-shaped projections (one per model layer, e.g. every ``qkv_proj``) stacked:
    ``layers[j].lora_a`` is ``a[j]``, so one slot of all of them is ``a[:, slot]`` (one copy fills it)."""

    layers: list[LoRALinear]
    shards: int
    a: torch.Tensor  # [n, max_loras, S * R, in]
    b: torch.Tensor  # [n, max_loras, out, R]


class LoRALinear(Linear):
    """A :class:`Linear` plus ``lora_a`` [L, S*R, in] and ``lora_b`` [L, out, R] slot weights."""

    lora_state: LoRAState
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_shard_starts: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.lora_state
        if not state.active:
            return super().forward(x)
        slots = state.token_slots[: x.shape[0]]
        if state.project is not None:
            return state.project(x, self.lora_a, self.lora_b, slots, self.lora_shard_starts, super().forward)
        y = super().forward(x)
        state.add_lora(y, x, self.lora_a, self.lora_b, slots, self.lora_shard_starts)
        return y


@dataclass(slots=True)
class WrappedModel:
    """The result of :func:`wrap_model`."""

    state: LoRAState
    layers: list[LoRALinear] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)  # PEFT module path -> target
    groups: list[SlotGroup] = field(default_factory=list)
    # One full-rank slot's elements on the slots' device (off the CPU): write_slot lands a host adapter here
    # in one copy, then fills the slot from it on the device (see there).
    staging: torch.Tensor | None = None


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
    sample = next(p for p in model.parameters() if not p.is_meta)  # not a packed-head embedding's shape-only weight
    device, dtype = device or sample.device, dtype or sample.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    state = LoRAState(torch.full((max_tokens,), -1, dtype=torch.int64, device=device))
    wrapped = WrappedModel(state)
    found: list[tuple[str, Linear, int]] = []  # (name, layer, shards)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is not Linear or leaf not in PLAIN:
            continue
        shards = FUSED.get(leaf, ())
        found.append((name, module, len(module.output_sizes) if len(shards) == len(module.output_sizes) else 1))
    # One stacked tensor per kind of projection (same leaf and shape in every layer).
    keys: dict[tuple[str, int, int, int], list[int]] = {}
    for i, (name, module, num_shards) in enumerate(found):
        keys.setdefault((name.rsplit(".", 1)[-1], num_shards, module.input_size, module.output_size), []).append(i)
    placed: dict[int, tuple[int, int]] = {}  # found index -> (group, index in group)
    for (_, num_shards, in_f, out_f), members in keys.items():
        n = len(members)
        a = torch.zeros(n, max_loras, num_shards * max_rank, in_f, dtype=dtype, device=device)
        b = torch.zeros(n, max_loras, out_f, max_rank, dtype=dtype, device=device)
        group = SlotGroup([], num_shards, a, b)
        for j, i in enumerate(members):
            placed[i] = (len(wrapped.groups), j)
        wrapped.groups.append(group)
    if device.type != "cpu" and wrapped.groups:
        slot_elements = sum(g.a[:, 0].numel() + g.b[:, 0].numel() for g in wrapped.groups)
        wrapped.staging = torch.empty(slot_elements, dtype=dtype, device=device)
    for i, (name, module, num_shards) in enumerate(found):
        leaf = name.rsplit(".", 1)[-1]
        parent = name[: -len(leaf)]
        g, j = placed[i]
        group = wrapped.groups[g]
        module.__class__ = LoRALinear
        assert isinstance(module, LoRALinear)
        module.lora_state = state
        module.register_buffer("lora_a", group.a[j], persistent=False)
        module.register_buffer("lora_b", group.b[j], persistent=False)
        group.layers.append(module)
        starts = [0]
        for size in module.output_sizes[:-1]:
            starts.append(starts[-1] + size)
        module.lora_shard_starts = tuple(starts) if num_shards > 1 else (0,)
        wrapped.layers.append(module)
        wrapped.targets[name] = Target(module, None, module.input_size, module.output_size, g, j)
        if num_shards > 1:
            for k, sub in enumerate(FUSED[leaf]):
                wrapped.targets[parent + sub] = Target(module, k, module.input_size, module.output_sizes[k], g, j)
    if not wrapped.layers:
        raise ValueError(
            f"{type(model).__name__} has no projection LoRA can adapt (q/k/v/o, gate/up/down as plain linear layers)"
        )
    return wrapped


def write_slot(wrapped: WrappedModel, slot: int, host: HostAdapter) -> None:
    """Fill ``slot`` of every wrapped layer with one adapter (read by :func:`kvik.lora.host.read_host_adapter`).

    One copy per stacked tensor (and a fill for the groups the adapter leaves out, or the rank
    padding of a smaller adapter), stream-ordered after the work already queued, so a step in
    flight that still reads this slot's old adapter is not disturbed.

    A slot of a stacked tensor is strided (the slot is its second dimension), and torch copies host
    memory into a strided device tensor through a device temporary of its size: an allocation on the
    step, which with the memory planned full waited for the step in flight (run j: 15.6 ms a fill with
    64 slots, 0.8 ms with 8). So with ``wrapped.staging`` the host buffer first lands there in one
    contiguous copy, and the strided copies run device to device.
    """
    buffer = host.buffer
    staging = wrapped.staging
    if staging is not None:
        if buffer.numel() > staging.numel():
            raise RuntimeError(f"an adapter of {buffer.numel()} elements outgrows the {staging.numel()}-element staging")
        staging[: buffer.numel()].copy_(buffer, non_blocking=True)

    def on_device(part: torch.Tensor) -> torch.Tensor:  # a view of the host buffer -> the same view of staging
        if staging is None:
            return part
        start = (part.data_ptr() - buffer.data_ptr()) // part.element_size()
        return staging[start : start + part.numel()].view(part.shape)

    for g, group in enumerate(wrapped.groups):
        base, step = group.a.data_ptr(), group.a.stride(0) * group.a.element_size()
        if any(layer.lora_a.data_ptr() != base + j * step for j, layer in enumerate(group.layers)):
            raise RuntimeError("the LoRA slot buffers were moved off their stacked storage (model.to after wrap?)")
        a_slot, b_slot = group.a[:, slot], group.b[:, slot]  # [n, S*R, in], [n, out, R]
        part = host.parts.get(g)
        if part is None:
            a_slot.zero_()
            b_slot.zero_()
            continue
        a, b = (on_device(t) for t in part)  # [n, S, r, in], [n, out, r]
        n, shards, rank, in_f = a.shape
        max_rank = b_slot.shape[2]
        a_blocks = a_slot.view(n, shards, max_rank, in_f)
        a_blocks[:, :, :rank].copy_(a, non_blocking=True)
        b_slot[:, :, :rank].copy_(b, non_blocking=True)
        if rank < max_rank:
            a_blocks[:, :, rank:].zero_()
            b_slot[:, :, rank:].zero_()
