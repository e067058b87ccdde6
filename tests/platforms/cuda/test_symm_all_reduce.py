"""The symmetric-memory all-reduce on two GPUs: the same sum as NCCL, bit-identical on both ranks, inside a
CUDA graph too, and None (NCCL's turn) for what it does not take. Skipped below two GPUs."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _check(rank: int, port: int) -> None:
    import torch.distributed as dist
    from kvik_cuda.symm_all_reduce import MAX_BYTES, symmetric_all_reduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    try:
        reduce = symmetric_all_reduce(dist.group.WORLD, torch.bfloat16, torch.device("cuda", rank))
        assert reduce is not None
        gen = torch.Generator(device="cuda").manual_seed(rank)
        for rows in (1, 7, 64, 256):
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
            got = reduce(x)
            want = x.clone()
            dist.all_reduce(want)
            assert got is not None and got.shape == x.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
            both = [torch.empty_like(got) for _ in range(2)]
            dist.all_gather(both, got)
            assert torch.equal(both[0], both[1])  # every rank holds the same bits
        x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
        eager = reduce(x)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            reduce(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        assert captured is not None and eager is not None and torch.equal(captured, eager)
        assert reduce(torch.ones(MAX_BYTES, device="cuda", dtype=torch.bfloat16)) is None  # too big: NCCL's
        assert reduce(torch.ones(8, device="cuda", dtype=torch.float16)) is None  # another dtype: NCCL's
    finally:
        dist.destroy_process_group()


def test_symmetric_all_reduce_matches_nccl() -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    mp.spawn(_check, args=(port,), nprocs=2)
