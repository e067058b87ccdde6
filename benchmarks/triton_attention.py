"""Micro-benchmark of the triton attention kernels on a GPU (Llama-3.1-8B attention shape by default).

    python benchmarks/triton_attention.py

Decode: achieved KV read bandwidth (K and V of every context token, bf16) for the
auto split count, no splits, tile variants, and the torch reference backend.
Prefill: TFLOP/s over the causal pairs, against torch SDPA (flash) on the same
tokens laid out contiguously. Median of CUDA-event timings (triton.testing.do_bench).
"""

# ruff: noqa: B023  (every lambda is timed immediately, inside its loop iteration)
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import Recorder
from kvik.attention.backend import AttentionMetadata
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik_triton_attention.backend import TritonAttentionBackend

H, KVH, D, BS = 32, 8, 128, 16


def make(reqs: list[tuple[int, int]], dtype: torch.dtype = torch.bfloat16):
    """(query, kv_cache, metadata) for (cached, new) per request, built on the GPU with shuffled blocks."""
    dev = "cuda"
    nblocks = [-(-(c + n) // BS) for c, n in reqs]
    total = 1 + sum(nblocks)
    perm = torch.randperm(total - 1, device=dev).to(torch.int32) + 1
    width = max(nblocks)
    tables = torch.zeros(len(reqs), width, dtype=torch.int32, device=dev)
    off = 0
    for i, nb in enumerate(nblocks):
        tables[i, :nb] = perm[off : off + nb]
        off += nb
    cache = torch.randn(2, total, BS, KVH, D, dtype=dtype, device=dev)
    q_lens = [n for _, n in reqs]
    seq = [c + n for c, n in reqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    slots = torch.cat(
        [
            tables[i, torch.arange(c, c + n, device=dev) // BS].long() * BS + torch.arange(c, c + n, device=dev) % BS
            for i, (c, n) in enumerate(reqs)
        ]
    )
    meta = AttentionMetadata(
        num_tokens=sum(q_lens),
        num_reqs=len(reqs),
        query_start_loc=qsl,
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=dev),
        block_tables=tables,
        slot_mapping=slots,
        block_size=BS,
        max_query_len=max(q_lens),
        max_seq_len=max(seq),
        query_lens_cpu=q_lens,
        seq_lens_cpu=seq,
    )
    query = torch.randn(sum(q_lens), H, D, dtype=dtype, device=dev)
    return query, cache, meta


def variant(name: str, **attrs: object) -> type[TritonAttentionBackend]:
    return type(name, (TritonAttentionBackend,), dict(attrs))


def bench(fn) -> float:  # type: ignore[no-untyped-def]
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def decode(record: Recorder) -> None:
    variants = {
        "auto": TritonAttentionBackend,
        "nosplit": variant("NoSplit", force_num_splits=1),
        "n32": variant("N32", decode_tile=(16, 32, 4)),
        "n128": variant("N128", decode_tile=(16, 128, 4)),
        "n64w2": variant("N64W2", decode_tile=(16, 64, 2)),
        "stages3": variant("S3", num_stages=3),
    }
    for batch, ctx in [(1, 1024), (1, 8192), (8, 2048), (32, 1024), (64, 1024), (128, 700), (256, 700), (256, 2048)]:
        query, cache, meta = make([(ctx - 1, 1)] * batch)
        kv_bytes = batch * ctx * KVH * D * 2 * 2
        ref = TorchRefAttentionBackend(H, D, KVH, D**-0.5)
        TorchRefAttentionBackend.prepare(meta)
        # torch_ref writes K/V first: hand it the values already there so both see the same cache
        slots = meta.slot_mapping
        k_now = cache[0].view(-1, KVH, D)[slots].clone()
        v_now = cache[1].view(-1, KVH, D)[slots].clone()
        expected = ref.forward(query, k_now, v_now, cache, meta)
        row = {"batch": batch, "ctx": ctx}
        for name, cls in variants.items():
            backend = cls(H, D, KVH, D**-0.5)
            out = torch.empty_like(query)
            meta.backend_data.clear()
            backend.attend(query, cache, meta, out)
            err = rel_err(out, expected)
            ms = bench(lambda b=backend, o=out: b.attend(query, cache, meta, o))
            row[name] = {
                "us": round(ms * 1e3, 1),
                "GB/s": round(kv_bytes / ms / 1e6),
                "err": f"{err:.1e}",
                "splits": backend.num_splits(meta, query.device, backend._tile(True)[2]),
            }
        meta.backend_data.clear()
        TorchRefAttentionBackend.prepare(meta)
        ms = bench(lambda: ref.forward(query, k_now, v_now, cache, meta))
        row["torch_ref"] = {"us": round(ms * 1e3, 1), "GB/s": round(kv_bytes / ms / 1e6)}
        record(event="decode", **row)


def decode_tiles(record: Recorder) -> None:
    """Large decode batches (offline throughput's regime) with a bf16 and an FP8 cache: the default decode tile
    against longer KV tiles and deeper pipelining. A tile's bytes halve with an FP8 cache, so the tile that keeps
    enough bytes in flight may be longer there."""
    shapes = {"default": ((16, 64, 4), 2), "n128": ((16, 128, 4), 2), "n128w8": ((16, 128, 8), 2),
              "n256w8": ((16, 256, 8), 2), "s3": ((16, 64, 4), 3), "n128s3": ((16, 128, 4), 3),
              "n64w2s3": ((16, 64, 2), 3)}  # fmt: skip
    # Each variant is the same tile for both caches (the backend's own choice for FP8 is n64w2s3).
    variants = {name: variant(name, decode_tile=tile, fp8_decode_tile=tile, num_stages=stages, fp8_decode_stages=stages)
                for name, (tile, stages) in shapes.items()}  # fmt: skip
    for batch, ctx in [(256, 830), (128, 830), (256, 2048), (32, 1024)]:
        query, cache16, meta = make([(ctx - 1, 1)] * batch)
        for kv_name, cache in (("bf16", cache16), ("fp8", cache16.to(torch.float8_e4m3fn))):
            kv_bytes = batch * ctx * KVH * D * 2 * cache.element_size()
            row: dict[str, object] = {"batch": batch, "ctx": ctx, "kv": kv_name}
            expected = None
            for name, cls in variants.items():
                backend = cls(H, D, KVH, D**-0.5)
                out = torch.empty_like(query)
                meta.backend_data.clear()
                try:
                    backend.attend(query, cache, meta, out)
                    expected = out.clone() if expected is None else expected
                    ms = bench(lambda b=backend, o=out, c=cache: b.attend(query, c, meta, o))
                except Exception as exc:  # a tile that does not compile (registers, shared memory) is recorded
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    continue
                row[name] = {"us": round(ms * 1e3, 1), "GB/s": round(kv_bytes / ms / 1e6),
                             "err_vs_default": f"{rel_err(out, expected):.1e}"}  # fmt: skip
            record(event="decode_tiles", **row)
            del cache


def prefill(record: Recorder, kv: str = "bf16") -> None:
    """Prefill / chunked / mixed steps over tiles; ``kv="fp8"``: over an FP8 cache (its V keys-contiguous, which
    the prefill tile reads otherwise than the decode tile), TFLOP/s without the SDPA peer."""
    variants = {
        "m64n64": TritonAttentionBackend,
        "m128n64w8": variant("M128", prefill_tile=(128, 64, 8)),
        "m128n32w4": variant("M128N32", prefill_tile=(128, 32, 4)),
        "m64n32": variant("M64N32", prefill_tile=(64, 32, 4)),
        "m64n64s3": variant("M64S3", num_stages=3),
        "m128n64w8s3": variant("M128S3", prefill_tile=(128, 64, 8), num_stages=3),
    }
    for label, reqs in [
        ("1x2048", [(0, 2048)]),
        ("8x1024", [(0, 1024)] * 8),
        ("chunk512+1536", [(1536, 512)] * 4),
        ("mixed", [(0, 1000)] * 4 + [(700, 1)] * 200),
    ]:
        query, cache, meta = make(reqs)
        if kv == "fp8":
            cache = cache.to(torch.float8_e4m3fn)
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in reqs)
        flops = 4 * H * D * pairs
        row: dict[str, object] = {"case": label}
        ref_out = None
        for name, cls in variants.items():
            backend = cls(H, D, KVH, D**-0.5)
            out = torch.empty_like(query)
            backend.attend(query, cache, meta, out)
            if ref_out is None:
                ref_out = out.clone()
            ms = bench(lambda b=backend, o=out: b.attend(query, cache, meta, o))
            row[name] = {
                "ms": round(ms, 3),
                "TFLOP/s": round(flops / ms / 1e9, 1),
                "err_vs_first": f"{rel_err(out, ref_out):.1e}",
            }
        if label == "1x2048" and kv == "bf16":  # SDPA flash on the same tokens, contiguous
            n = 2048
            q = query.view(1, n, H, D).transpose(1, 2)
            kk = torch.randn(1, KVH, n, D, dtype=query.dtype, device="cuda")
            vv = torch.randn_like(kk)
            f = torch.nn.functional.scaled_dot_product_attention
            ms = bench(lambda: f(q, kk, vv, is_causal=True, enable_gqa=True))
            row["sdpa"] = {"ms": round(ms, 3), "TFLOP/s": round(flops / ms / 1e9, 1)}
        record(event="prefill" if kv == "bf16" else "prefill_fp8", **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sections", default="decode,prefill", help="any of decode, decode_tiles, prefill, prefill_fp8")
    args = ap.parse_args()
    record = Recorder("triton_attention")
    torch.manual_seed(0)
    sections = args.sections.split(",")
    if "decode" in sections:
        decode(record)
    if "decode_tiles" in sections:
        decode_tiles(record)
    if "prefill" in sections:
        prefill(record)
    if "prefill_fp8" in sections:
        prefill(record, "fp8")


if __name__ == "__main__":
    main()
