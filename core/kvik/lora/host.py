"""An adapter in host memory, laid out as the device slots are: one read, one buffer, a few copies.

The slot weights of same-shaped projections of every layer are stacked tensors
(:class:`kvik.lora.layers.SlotGroup`: all ``qkv_proj`` layers, all ``o_proj`` ...).
:func:`read_host_adapter` reads a checked PEFT checkpoint straight into one host
buffer (page-locked when the slots are on a GPU) holding, per group the adapter
touches, ``A [n, S, r, in]`` and ``B [n, out, r]`` (scaling folded into ``B``,
rank ``r`` of the adapter, zeros for the layers / shards it leaves out). Filling a
slot from it is then one copy per stacked tensor (:func:`kvik.lora.layers.write_slot`):
8 for a Llama, not one per layer and projection.

The file is read with ``readinto`` at each tensor's offset into its place in the
buffer (no memory map to fault in, no intermediate copies when the file's dtype is
the slots'); this runs on the prefetch thread, so the engine step only copies.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvik.lora.adapter import _KEY, WEIGHTS_FILE, AdapterInfo, safetensors_header

if TYPE_CHECKING:
    from kvik.lora.layers import WrappedModel

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(slots=True)
class HostAdapter:
    """An adapter's weights in host memory, per slot group: group index -> (A [n, S, r, in], B [n, out, r])."""

    info: AdapterInfo
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]]
    buffer: torch.Tensor  # the one allocation every part views

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def _read_into(f: io.FileIO, start: int, nbytes: int, dest: torch.Tensor) -> None:
    """Read ``nbytes`` at ``start`` into the contiguous tensor ``dest`` (its bytes, as they are)."""
    view = dest.view(torch.uint8).reshape(-1).numpy().data  # a memoryview of dest's bytes
    f.seek(start)
    done = 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{f.name}: truncated (wanted {nbytes} bytes at {start})")
        done += got


def read_host_adapter(info: AdapterInfo, wrapped: WrappedModel, dtype: torch.dtype, pin: bool) -> HostAdapter:
    """Read a checked adapter into its slot layout in ``dtype`` (``B`` scaled in float32, rounded once)."""
    file = Path(info.path) / WEIGHTS_FILE
    data_start, header = safetensors_header(file)
    groups = wrapped.groups
    touched = sorted({wrapped.targets[m].group for m in info.modules})
    r = info.rank
    sizes = {g: (groups[g].a.shape[0] * groups[g].shards * r * groups[g].a.shape[3],
                 groups[g].b.shape[0] * groups[g].b.shape[2] * r) for g in touched}  # fmt: skip
    buffer = torch.empty(sum(a + b for a, b in sizes.values()), dtype=dtype, pin_memory=pin)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for g in touched:
        group, (na, nb) = groups[g], sizes[g]
        n, in_f, out_f = group.a.shape[0], group.a.shape[3], group.b.shape[2]
        a = buffer[offset : offset + na].view(n, group.shards, r, in_f)
        b = buffer[offset + na : offset + na + nb].view(n, out_f, r)
        offset += na + nb
        # (layer, shard) blocks the checkpoint fills; a fused target (shard None) fills all of its layer's.
        filled = {(t.index, k) for t in (wrapped.targets[m] for m in info.modules) if t.group == g
                  for k in (range(group.shards) if t.shard is None else (t.shard,))}  # fmt: skip
        if len(filled) < n * group.shards:  # layers / shards the adapter leaves out are zeros
            a.zero_()
            b.zero_()
        parts[g] = (a, b)
    with file.open("rb", buffering=0) as f:
        for name, meta in header.items():
            match = _KEY.match(name)
            assert match is not None, name  # check_adapter accepted every key
            target = wrapped.targets[match["module"]]
            a, b = parts[target.group]
            layer, shard = target.layer, target.shard
            begin, end = (int(x) for x in meta["data_offsets"])
            src_dtype = _DTYPES[meta["dtype"]]  # check_adapter accepted it (adapter.WEIGHT_DTYPES)
            if match["ab"] == "A":
                dest = a[target.index, 0 if shard is None else shard]
                _load(f, data_start + begin, end - begin, src_dtype, dest, None)
                if shard is None:  # a fused target (Phi-3's qkv_proj): every shard's rank block gets A
                    a[target.index, 1:].copy_(dest.expand(a.shape[1] - 1, *dest.shape))
            else:
                rows = layer.shard_rows(shard)
                _load(f, data_start + begin, end - begin, src_dtype, b[target.index, rows], info.scaling)
    return HostAdapter(info, parts, buffer)


def _load(
    f: io.FileIO, start: int, nbytes: int, src_dtype: torch.dtype, dest: torch.Tensor, scale: float | None
) -> None:
    """One tensor into ``dest``: read in place when the dtypes match, else through a scratch buffer;
    ``scale``: multiply in float32 and round to ``dest``'s dtype once."""
    if nbytes != dest.numel() * src_dtype.itemsize:
        raise ValueError(
            f"{f.name}: a tensor holds {nbytes} bytes, its shape needs {dest.numel() * src_dtype.itemsize}"
        )
    if src_dtype == dest.dtype:
        _read_into(f, start, nbytes, dest)
        if scale is not None and scale != 1.0:
            # In place, no float32 copy: torch multiplies bf16 / fp16 by a Python scalar in float32 and
            # rounds once, the same bits as (b.float() * scale).to(dtype) (tests/core/lora/test_lora_host.py).
            dest.mul_(scale)
        return
    scratch = torch.empty(dest.shape, dtype=src_dtype)
    _read_into(f, start, nbytes, scratch)
    dest.copy_(scratch.float().mul_(scale) if scale is not None else scratch)
