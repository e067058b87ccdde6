"""Deterministic mode on a GPU: bitwise batch invariance, and its throughput cost (docs/deterministic.md).

    python benchmarks/deterministic_check.py [--n 300] [--sizes 1,2,3,7,16,33,64,128,256] [--shapes llama8b,smollm2]
        [--skip matmul,invariance,throughput]

Dummy (seeded random) bf16 weights from a config alone; nothing is downloaded. Parts, each
recorded even when another fails:

* ``matmul``: the Triton GEMM (kvik_cuda.batch_invariant) on the 8B layer shapes: one row
  computed alone and inside M-row batches (M up to 8192) at random places, mismatching rows
  counted (must be 0); cuBLAS (F.linear) on the same inputs for contrast; and both GEMMs'
  speed (TFLOP/s) at decode and prefill M.
* ``invariance_<shape>`` (8B by default; ``--shapes llama8b,smollm2`` adds SmolLM2's): an engine with ``deterministic=True`` (prefix caching and chunked
  prefill on, CUDA graphs on) generates one prompt alone (greedy, 16 tokens, top-20
  logprobs), then inside batches of each ``--sizes`` with different random neighbours (some
  sharing its prefix, random lengths and output lengths) at a random place; every
  mismatching token or logprob bit is counted (must be 0).
* ``throughput``: offline output tok/s on ``--n`` requests of the usual workload (prompts
  U[128, 1024], 256 new tokens, greedy, EOS ignored) on the 8B shape, deterministic on vs
  off; ``slowdown`` = 1 - on / off (the issue's target: <= 0.30).

JSON goes to stdout and to $OUT/deterministic_check.json (or /tmp).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import SHAPES, workload

RESULTS: dict[str, Any] = {"parts": {}, "errors": {}}
OUT = Path(os.environ.get("OUT", "/tmp"))


def save() -> None:
    text = json.dumps(RESULTS, indent=1, default=str)
    (OUT / "deterministic_check.json").write_text(text)


def part(name: str, fn: Callable[[], Any]) -> None:
    """Run one part; a failure is recorded with its traceback and the others still run."""
    start = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    try:
        RESULTS["parts"][name] = fn()
        print("RESULT " + json.dumps({name: RESULTS["parts"][name]}, default=str), flush=True)
    except Exception as exc:  # one part's failure must not lose the others
        RESULTS["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        print(RESULTS["errors"][name], flush=True)
    finally:
        import torch

        gc.collect()
        torch.cuda.empty_cache()
    print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
    save()


def model_dir(shape: str) -> Path:
    from gpu_common import dummy_model_dir

    return dummy_model_dir(Path(os.environ.get("KVIK_BENCH_DIR", "/tmp/kvik_bench")), shape)


DEVICE = "cuda"


_ENGINES: dict[tuple[str, bool], Any] = {}


def engine(shape: str, deterministic: bool) -> Any:
    """The engine for (shape, mode), built once: the invariance and throughput parts share the 8B one."""
    key = (shape, deterministic)
    if key not in _ENGINES:
        for other in list(_ENGINES):  # one engine on the GPU at a time
            release(*other)
        _ENGINES[key] = _build(shape, deterministic)
    return _ENGINES[key]


def release(shape: str, deterministic: bool) -> None:
    llm = _ENGINES.pop((shape, deterministic), None)
    if llm is not None:
        llm.llm_engine.shutdown()


def _build(shape: str, deterministic: bool, max_num_seqs: int = 256) -> Any:
    from kvik import LLM

    smoke = {"num_threads": 1} if DEVICE == "cpu" else {}  # a CPU smoke run on a shared machine
    return LLM(str(model_dir(shape)), load_format="dummy", dtype="bfloat16", device=DEVICE, max_model_len=2048,
               deterministic=deterministic, max_num_seqs=max_num_seqs, gpu_memory_utilization=0.85,
               enable_prefix_caching=True, enable_chunked_prefill=True, **smoke)  # fmt: skip


# -- the GEMM -----------------------------------------------------------------------------------
def check_matmul() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import triton.testing
    from kvik_cuda.batch_invariant import invariant_matmul, tile_for

    s = SHAPES["llama8b"]
    h, inter, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    layers = {"qkv": (6144, h), "o": (h, h), "gate_up": (2 * inter, h), "down": (h, inter), "lm_head": (vocab, h)}
    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, Any] = {}
    for name, (n, k) in layers.items():
        w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
        target = torch.randn(1, k, device="cuda", generator=g).bfloat16()
        alone_inv = invariant_matmul(target, w)[0]
        alone_cublas = F.linear(target, w)[0]
        mism_inv = mism_cublas = checked = 0
        for m in (1, 2, 3, 17, 64, 127, 128, 129, 256, 1000, 4096, 8192):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            for place in {0, m // 2, m - 1}:
                x[place] = target[0]
                checked += 1
                mism_inv += int(not torch.equal(invariant_matmul(x, w)[place], alone_inv))
                mism_cublas += int(not torch.equal(F.linear(x, w)[place], alone_cublas))
        speed = {}
        for m in (1, 64, 256, 2048, 8192):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            flops = 2 * m * n * k
            inv_ms = triton.testing.do_bench(lambda: invariant_matmul(x, w), warmup=5, rep=30)  # noqa: B023
            cub_ms = triton.testing.do_bench(lambda: F.linear(x, w), warmup=5, rep=30)  # noqa: B023
            speed[m] = {"invariant_tflops": flops / inv_ms / 1e9, "cublas_tflops": flops / cub_ms / 1e9,
                        "invariant_over_cublas_time": inv_ms / cub_ms}  # fmt: skip
        out[name] = {"shape": [n, k], "tiles": {m: tile_for(n, k, m, w.dtype) for m in (1, 256, 2048)},  # (tile, TMA)
                     "rows_checked": checked,
                     "mismatches": mism_inv, "cublas_mismatches_for_contrast": mism_cublas, "speed": speed}  # fmt: skip
    out["total_mismatches"] = sum(v["mismatches"] for v in out.values() if isinstance(v, dict))
    return out


# -- the engine ---------------------------------------------------------------------------------
def _signature(output: Any) -> tuple[list[int], list[list[tuple[int, float]]]]:
    c = output.outputs[0]
    return list(c.token_ids), [sorted((t, lp.logprob) for t, lp in entry.items()) for entry in c.logprobs]


def check_invariance(shape: str, sizes: list[int]) -> dict[str, Any]:
    from kvik import SamplingParams

    vocab = SHAPES[shape]["vocab_size"]
    llm = engine(shape, deterministic=True)
    rng = random.Random(7)
    target = workload(1, vocab, 300, 300, seed=99)[0]
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=20, ignore_eos=True)
    alone = _signature(llm.generate([target], params, use_tqdm=False)[0])
    again = _signature(llm.generate([target], params, use_tqdm=False)[0])  # its prefix now cached
    results = []
    for size in sizes:
        others = workload(size - 1, vocab, 16, 1024, seed=rng.randrange(10**6))
        for i in range(len(others)):
            if rng.random() < 0.25:  # shares the target's prefix: prefix-cache hits
                others[i] = target[: rng.randrange(16, 290)] + others[i][:200]
        place = rng.randrange(size)
        prompts = [*others[:place], target, *others[place:]]
        plist = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 40), ignore_eos=True) for _ in others]
        plist.insert(place, params)
        t0 = time.perf_counter()
        got = _signature(llm.generate(prompts, plist, use_tqdm=False)[place])
        token_mism = sum(a != b for a, b in zip(got[0], alone[0], strict=True))
        lp_mism = sum(a != b for a, b in zip(got[1], alone[1], strict=True))
        results.append({"batch": size, "place": place, "token_mismatches": token_mism,
                        "logprob_step_mismatches": lp_mism, "s": round(time.perf_counter() - t0, 2)})  # fmt: skip
        print(results[-1], flush=True)
    return {
        "alone_vs_prefix_cached_rerun_equal": again == alone,
        "batches": results,
        "total_mismatches": sum(r["token_mismatches"] + r["logprob_step_mismatches"] for r in results)
        + (again != alone),
    }


def throughput(shape: str, deterministic: bool, n: int) -> dict[str, Any]:
    from kvik import SamplingParams

    prompts = workload(n, SHAPES[shape]["vocab_size"])
    llm = engine(shape, deterministic=deterministic)
    params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.llm_engine.scheduler.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": n, "output_tokens": tokens, "seconds": round(seconds, 2),
            "output_tok_per_s": round(tokens / seconds, 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="requests for the throughput comparison")
    ap.add_argument("--sizes", default="1,2,3,7,16,33,64,128,256", help="batch sizes for the invariance check")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: matmul, invariance, throughput")
    ap.add_argument("--shapes", default="llama8b", help="shapes for the invariance check (also: smollm2)")
    ap.add_argument("--throughput-shape", default="llama8b")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the engine parts (--shapes tiny)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    import torch

    RESULTS["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if "matmul" not in skip:
        part("matmul", check_matmul)
    shapes = list(filter(None, args.shapes.split(",")))
    # The throughput shape's deterministic engine serves its invariance check and then its throughput run.
    shapes.sort(key=lambda shape: shape != args.throughput_shape)
    if "invariance" not in skip and shapes and shapes[0] == args.throughput_shape:
        part(f"invariance_{shapes.pop(0)}", lambda: check_invariance(args.throughput_shape, sizes))
    if "throughput" not in skip:
        part("throughput_deterministic", lambda: throughput(args.throughput_shape, True, args.n))
        release(args.throughput_shape, True)
        part("throughput_default", lambda: throughput(args.throughput_shape, False, args.n))
        release(args.throughput_shape, False)
        on = RESULTS["parts"].get("throughput_deterministic")
        off = RESULTS["parts"].get("throughput_default")
        if on and off:
            RESULTS["slowdown"] = round(1 - on["output_tok_per_s"] / off["output_tok_per_s"], 3)
            RESULTS["slowdown_target_met"] = RESULTS["slowdown"] <= 0.30
            save()
    for shape in shapes if "invariance" not in skip else []:
        part(f"invariance_{shape}", lambda shape=shape: check_invariance(shape, sizes))
        release(shape, True)
    RESULTS["mismatches"] = sum(
        p.get("total_mismatches", 0) for p in RESULTS["parts"].values() if isinstance(p, dict)
    )
    RESULTS["seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(RESULTS, indent=1, default=str))
    summary = {k: RESULTS.get(k) for k in ("device", "mismatches", "slowdown", "slowdown_target_met", "seconds")}
    print("RESULT " + json.dumps({"summary": {**summary, "failed_parts": sorted(RESULTS["errors"])}}), flush=True)
    return 0 if not RESULTS["errors"] and RESULTS["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
