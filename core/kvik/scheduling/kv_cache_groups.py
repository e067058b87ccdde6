"""KV-cache groups: layers with different attention windows keep their blocks apart.

A model whose layers all see the whole context (or all slide with one window) needs one block table per
request: block ``i`` of the table holds positions ``[i * bs, (i + 1) * bs)`` in every layer. A model mixing
sliding-window and global layers (Gemma 2's 1:1, Gemma 3's 5:1) would then keep every block for its
global layers' sake, though its sliding layers read only the last ``window`` tokens. So its layers are split
into *groups* of equal size, each group made of layers with one window, and each group gets a block table
of its own: a sliding group's table frees the blocks its window has passed while a global group's keeps
them. This is how vLLM's hybrid KV-cache manager saves memory on such models.

The groups share one pool of block ids. A block id is a page in ``num_tensors`` KV tensors, and the ``j``-th
layer of every group lives in tensor ``j``: a block id given to group ``g`` is used by group ``g``'s layers
only, so the tensors are shared without two layers ever writing one page. A block then costs
``num_tensors`` layers' pages instead of every layer's.

Tables travel interleaved: a request's table holds ``num_groups`` ids per block position (position ``i``,
group ``g`` at index ``i * num_groups + g``), so every group's table grows in step with the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvik.scheduling.kv_cache_manager import blocks_held_at_most, cdiv


@dataclass(frozen=True, slots=True)
class KVCacheGroups:
    """Which block table and which KV tensor each attention layer uses."""

    windows: tuple[int | None, ...]  # per group: the sliding window of its layers (None: the whole context)
    layer_group: tuple[int, ...]  # per attention layer, in model order: its group
    layer_tensor: tuple[int, ...]  # per attention layer: the KV tensor it reads and writes
    num_tensors: int  # KV tensors allocated (a block id is one page in each)

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @classmethod
    def single(cls, num_layers: int, window: int | None = None) -> KVCacheGroups:
        """One group: every layer in a tensor of its own, all reading one block table (with ``window`` set,
        every layer slides with it and blocks behind it are freed)."""
        return cls((window,), (0,) * num_layers, tuple(range(num_layers)), num_layers)


def shared_window(layer_windows: Sequence[int | None]) -> int | None:
    """The window every layer slides with, when they all share one (None: some layer sees the whole context,
    or no layer is given)."""
    windows = set(layer_windows)
    return windows.pop() if len(windows) == 1 else None


def plan_kv_cache_groups(
    layer_windows: Sequence[int | None],
    split: bool = True,
    *,
    max_model_len: int | None = None,
    block_size: int = 1,
    step_tokens: int = 0,
) -> KVCacheGroups:
    """Group attention layers by window (``layer_windows``: one per layer, None for a global layer).

    Layers sharing one window make one group. Mixed windows with ``split`` give groups of ``S`` layers,
    ``S`` the size of the smallest window class; each class is cut into groups of ``S`` in layer order (the
    last one shorter where ``S`` does not divide it; the pages its missing layers would use stay idle). Without
    ``split`` (a runner keeping one table), mixed windows make one group that keeps every block.

    With ``max_model_len`` (and the ``block_size`` and ``step_tokens`` the scheduler will use), the split is
    kept only where a request of that length holds fewer pages than in one group: requests no longer than a
    window (plus a step) free nothing, and the shorter last group's idle pages would then be a loss.
    """
    n = len(layer_windows)
    if n == 0:
        raise ValueError("a model needs at least one attention layer to plan its KV cache")
    classes: dict[int | None, list[int]] = {}
    for i, window in enumerate(layer_windows):
        if window is not None and window < 1:
            raise ValueError(f"layer {i}'s sliding window must be >= 1, got {window}")
        classes.setdefault(window, []).append(i)
    if len(classes) == 1:
        return KVCacheGroups.single(n, layer_windows[0])
    if not split:
        return KVCacheGroups.single(n, None)
    size = min(len(layers) for layers in classes.values())
    windows: list[int | None] = []
    layer_group, layer_tensor = [0] * n, [0] * n
    # Global layers first, then windows in increasing order: the order is fixed, so every rank agrees.
    for window in sorted(classes, key=lambda w: -1 if w is None else w):
        layers = classes[window]
        for start in range(0, len(layers), size):
            for j, layer in enumerate(layers[start : start + size]):
                layer_group[layer], layer_tensor[layer] = len(windows), j
            windows.append(window)
    groups = KVCacheGroups(tuple(windows), tuple(layer_group), tuple(layer_tensor), size)
    if max_model_len is not None:
        pages_split = blocks_held_at_most(max_model_len, block_size, groups.windows, step_tokens) * size
        if pages_split >= cdiv(max_model_len, block_size) * n:
            return KVCacheGroups.single(n, None)
    return groups
