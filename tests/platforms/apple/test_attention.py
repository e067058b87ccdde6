"""mlx_paged against kvik's torch reference backend on the same mixed batch and cache."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

import torch  # noqa: E402
from kvik.attention.backend import AttentionMetadata  # noqa: E402
from kvik.attention.torch_ref import TorchRefAttentionBackend  # noqa: E402
from kvik_apple.attention import MLXPagedAttentionBackend  # noqa: E402

HEADS, KV_HEADS, HEAD, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 40


def _step(requests: list[tuple[int, int]], rng: np.random.Generator):
    """requests: (cached tokens, new tokens). Returns numpy inputs and the per-request layout."""
    free = list(rng.permutation(NUM_BLOCKS))
    tables, slots, q_lens, seq_lens = [], [], [], []
    for cached, new in requests:
        n_blocks = -(-(cached + new) // BLOCK)
        table = [int(free.pop()) for _ in range(n_blocks)]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
        q_lens.append(new)
        seq_lens.append(cached + new)
    width = max(len(t) for t in tables)
    table_arr = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        table_arr[i, : len(t)] = t
    tokens = sum(q_lens)
    data = dict(
        q=rng.standard_normal((tokens, HEADS, HEAD), dtype=np.float32),
        k=rng.standard_normal((tokens, KV_HEADS, HEAD), dtype=np.float32),
        v=rng.standard_normal((tokens, KV_HEADS, HEAD), dtype=np.float32),
        cache=rng.standard_normal((2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD), dtype=np.float32),
    )
    layout = dict(tables=table_arr, slots=np.array(slots), q_lens=q_lens, seq_lens=seq_lens)
    return data, layout


def _metadata(layout, to_array) -> AttentionMetadata:
    q_lens, seq_lens = layout["q_lens"], layout["seq_lens"]
    return AttentionMetadata(
        num_tokens=sum(q_lens),
        num_reqs=len(q_lens),
        query_start_loc=to_array(np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)),
        seq_lens=to_array(np.array(seq_lens, dtype=np.int32)),
        block_tables=to_array(layout["tables"]),
        slot_mapping=to_array(layout["slots"].astype(np.int64)),
        block_size=BLOCK,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
    )


CASES = {
    "decode-only-ragged": [(5, 1), (17, 1), (1, 1), (30, 1)],
    "prefill-only": [(0, 9), (0, 1), (0, 14)],
    "mixed-with-cached-prefix": [(12, 1), (0, 10), (8, 7), (25, 1), (4, 13)],
}


@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_ref(case, window):
    rng = np.random.default_rng(len(case) + (window or 0))
    data, layout = _step(CASES[case], rng)
    scale = HEAD**-0.5

    ref_meta = _metadata(layout, lambda a: torch.from_numpy(a))
    TorchRefAttentionBackend.prepare(ref_meta)
    ref_cache = torch.from_numpy(data["cache"].copy())
    ref_out = TorchRefAttentionBackend(HEADS, HEAD, KV_HEADS, scale, window).forward(
        torch.from_numpy(data["q"]), torch.from_numpy(data["k"]), torch.from_numpy(data["v"]), ref_cache, ref_meta
    )

    meta = _metadata(layout, lambda a: mx.array(a.astype(np.int32)))
    MLXPagedAttentionBackend.prepare(meta)
    cache = mx.array(data["cache"])
    out = MLXPagedAttentionBackend(HEADS, HEAD, KV_HEADS, scale, window).forward(
        mx.array(data["q"]), mx.array(data["k"]), mx.array(data["v"]), cache, meta
    )
    mx.eval(out, cache)
    np.testing.assert_allclose(np.array(out), ref_out.numpy(), rtol=1e-5, atol=1e-5)
    # The cache was updated in place, exactly as the reference wrote it.
    np.testing.assert_array_equal(np.array(cache), ref_cache.numpy())


def test_validate_declares_mlx_only():
    ok = MLXPagedAttentionBackend.validate(
        head_size=64, dtype="float16", device_type="mlx", block_size=16, sliding_window=None
    )
    assert ok == []
    reasons = MLXPagedAttentionBackend.validate(
        head_size=64, dtype="float32", device_type="cpu", block_size=16, sliding_window=None
    )
    assert reasons and "mlx" in reasons[0]


class _TorchBridge(MLXPagedAttentionBackend):
    """mlx_paged behind torch tensors, so the core's conformance suite (written for torch) can drive it.

    Every call copies the torch cache into MLX and the updated MLX cache back, so the
    suite's second step reads exactly what this backend wrote in the first.
    """

    supported_device_types = ("cpu",)

    @classmethod
    def prepare(cls, metadata: AttentionMetadata) -> None:
        import dataclasses

        def to_mx(t: torch.Tensor) -> mx.array:
            return mx.array(t.numpy().astype(np.int32))

        mlx_meta = dataclasses.replace(
            metadata,
            query_start_loc=to_mx(metadata.query_start_loc),
            seq_lens=to_mx(metadata.seq_lens),
            block_tables=to_mx(metadata.block_tables),
            slot_mapping=to_mx(metadata.slot_mapping),
            backend_data={},
        )
        MLXPagedAttentionBackend.prepare(mlx_meta)
        metadata.backend_data["mlx"] = mlx_meta

    def forward(self, query, key, value, kv_cache, metadata):  # type: ignore[override]
        dtype = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[query.dtype]

        def to_mx(t: torch.Tensor) -> mx.array:
            return mx.array(t.float().numpy()).astype(dtype)

        def to_torch(a: mx.array) -> torch.Tensor:
            return torch.from_numpy(np.array(a.astype(mx.float32))).to(query.dtype)

        cache = to_mx(kv_cache)
        out = super().forward(to_mx(query), to_mx(key), to_mx(value), cache, metadata.backend_data["mlx"])
        mx.eval(out, cache)
        kv_cache.copy_(to_torch(cache))
        return to_torch(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_core_conformance_suite(dtype):
    from kvik.testing.conformance.attention import check_attention_backend

    assert check_attention_backend(_TorchBridge, device="cpu", dtype=dtype) == 18
