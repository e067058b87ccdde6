"""The CPU KV pool: zeros (padded block-table entries read block 0), committed by the OS only where written."""

from __future__ import annotations

import ctypes
import gc
import sys

import pytest
import torch
from kvik.worker.torch_runner import _zeros

PAGE = 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_cpu_pool_is_zeros_of_the_shape_and_dtype(dtype: torch.dtype) -> None:
    shape = (2, 64, 16, 4, 8)
    pool = _zeros(shape, dtype, torch.device("cpu"))
    assert pool.shape == shape and pool.dtype == dtype and pool.is_contiguous()
    assert not pool.float().any()
    pool[1, 3] = 1  # writable, and a write lands where a zeros tensor's would
    expected = torch.zeros(shape, dtype=dtype)
    expected[1, 3] = 1
    assert torch.equal(pool.float(), expected.float())


def test_a_view_keeps_the_pool_alive() -> None:
    """The tensor owns nothing itself: a view of it must keep the mapped pages valid after the pool is dropped."""
    view = _zeros((4, 1024, 256), torch.float32, torch.device("cpu"))[2]
    gc.collect()
    view.fill_(3.0)
    assert torch.equal(view, torch.full((1024, 256), 3.0))


def _resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s storage that are in memory now (Linux ``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = tensor.data_ptr() & ~(PAGE - 1)
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    pages = (ctypes.c_ubyte * (-(-length // PAGE)))()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), pages) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(p & 1 for p in pages) * PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore's page residency is read the Linux way")
def test_a_pool_commits_only_the_pages_written() -> None:
    """A 64 MiB layer pool (K and V of 8k slots) after one prompt's writes holds a few pages, not the pool.

    numpy's calloc did not: glibc served it from recycled heap memory it had to clear, and numpy asked
    for transparent huge pages, so a 20-token prompt committed 2 MiB of K and of V in every layer.
    """
    kv = _zeros((2, 8192, 8, 256), torch.bfloat16, torch.device("cpu"))  # [K/V, slots, kv heads, head dim]
    assert _resident_bytes(kv) == 0  # nothing written: no page of it is in memory
    slots = torch.arange(16, 36)  # a 20-token prompt in block 1 of 16-slot blocks
    for half in (kv[0], kv[1]):
        half.index_copy_(0, slots, torch.ones(20, 8, 256, dtype=torch.bfloat16))
    written = 2 * 20 * 8 * 256 * 2  # bytes
    assert written <= _resident_bytes(kv) <= written + 4 * PAGE
    assert kv[0, 16:36].eq(1).all() and not kv[0, :16].any() and not kv[1, 36:].any()
