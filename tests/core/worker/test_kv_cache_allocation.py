"""The CPU KV pool: zeros (padded block-table entries read block 0), allocated lazily through calloc."""

from __future__ import annotations

import pytest
import torch
from kvik.worker.torch_runner import _zeros


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
