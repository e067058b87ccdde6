"""Tensor parallelism on two GPUs: correctness and speed, one JSON summary (the lead's H200 x2 check).

    python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton
    OUT=/some/dir python3 benchmarks/tp_benchmark.py   # 2 GPUs, <= 8 minutes; also writes $OUT/tp_benchmark.json

1. ``tokens``: a small random Llama (fp32 and bf16, written to a temp dir by kvik.testing.tiny_models):
   greedy tokens of TP=2 and PP=2 (multiprocess executor, NCCL) against TP=1, plus the largest
   top-logprob difference.
2. ``llama8b``: the Llama-3.1-8B shape with dummy weights (load_format="dummy", bf16): batch-1 decode
   ms/token ((t(129 new) - t(1 new)) / 128 after a 512-token prompt, best of 2) and a short offline run
   (256 requests, prompts U[128, 512], 128 new tokens each), TP=1 vs TP=2. TP=2 first tries CUDA graphs
   (the all-reduces captured) and falls back to eager, recording why.

3. ``dp2``: data parallelism, two whole engine replicas (one per GPU) behind kvik's router
   (:class:`kvik.engine.data_parallel.DataParallelLLM`, what ``kvik serve -dp 2`` runs), on the same
   offline workload as ``llama8b``'s, against one replica alone (target ≥ 1.9×).
4. ``llama70b``: the Llama-3.3-70B shape at TP=2 (dummy weights): batch-1 ms/token against the weight floor
   (141 GB over two GPUs' copy bandwidth) and the same offline run.

``--parts tokens,llama8b,dp2,llama70b`` picks parts (default: all but llama70b, which needs its own call);
with ``llama8b``: ``eager`` adds TP=1/TP=2 without CUDA graphs, ``pp2`` times pipeline_parallel_size=2 (eager,
two micro-batches in flight) against TP=1 eager, ``usual`` runs the issue's workload (1,000 requests,
U[128, 1024] -> 256) instead of the short one; TP=2 with graphs also profiles 32 decode steps at batch 1
and 64 (torch.profiler on every rank: the NCCL kernels' share of device time). ``dp_mp`` adds DP=1 and DP=2
with every replica's rank in a worker process (``distributed_executor_backend="mp"``); ``nccl`` adds TP=2
with every sum through NCCL (``disable_custom_all_reduce=True``). The DP parts and
``llama70b`` run the usual workload; ``llama70b`` also profiles.
Every part runs in its own try block: one failure is recorded and the others still report.
``--smoke`` runs the same flow on the CPU with an 8B-shaped model shrunk to toy size (checks the script).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

LLAMA8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
DEVICE = "cuda"
LLAMA70B = dict(
    hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
SMOKE_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=128256)  # fmt: skip
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, vocab_size=512)  # fmt: skip


def _error() -> str:
    return traceback.format_exc(limit=6)[-3000:]


def _shutdown(llm: Any) -> None:
    import gc

    import torch

    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_tokens(root: Path) -> dict[str, Any]:
    """TP=2 / PP=2 vs TP=1 greedy tokens on a small random model, fp32 and bf16."""
    from kvik import LLM, SamplingParams
    from kvik.testing.tiny_models import make_tiny_model

    path = make_tiny_model(root / "small", "llama", **SMALL)
    prompts = ["Hello world", "The quick brown fox jumps over", "Once upon a time", "def main():\n    print("]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=3)
    result: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        kv = (1 << 30) if DEVICE == "cuda" else 16 << 20
        # max_num_seqs=8: few CUDA graphs to capture (the graphs, all-reduces included, still run)
        base = dict(model=str(path), device=DEVICE, dtype=dtype, kv_cache_memory=kv, max_model_len=512, max_num_seqs=8)
        outputs: dict[str, Any] = {}
        for name, extra in (("tp1", {}), ("tp2", {"tensor_parallel_size": 2}), ("pp2", {"pipeline_parallel_size": 2})):
            llm = None
            try:
                llm = LLM(**base, **extra)
                outputs[name] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            except Exception:
                result[f"{dtype}_{name}_error"] = _error()
            finally:
                if llm is not None:
                    _shutdown(llm)
        ref = outputs.get("tp1")
        for name in ("tp2", "pp2"):
            got = outputs.get(name)
            if ref is None or got is None:
                continue
            same = sum(g.token_ids == r.token_ids for g, r in zip(got, ref, strict=True))
            worst, close = 0.0, 0
            for g, r in zip(got, ref, strict=True):
                # Up to and including the first differing token the two saw the same context.
                for pos, (gp, rp) in enumerate(zip(g.logprobs or [], r.logprobs or [], strict=False)):
                    worst = max([worst] + [abs(gp[t].logprob - lp.logprob) for t, lp in rp.items() if t in gp])
                    if g.token_ids[pos] != r.token_ids[pos]:
                        # vLLM's closeness rule: each side's choice is among the other's top logprobs.
                        close += int(g.token_ids[pos] in rp and r.token_ids[pos] in gp)
                        break
                else:
                    close += 1
            result[f"{dtype}_{name}_identical"] = f"{same}/{len(ref)}"
            result[f"{dtype}_{name}_logprobs_close"] = f"{close}/{len(ref)}"
            result[f"{dtype}_{name}_max_logprob_diff_before_divergence"] = round(worst, 6)
    return result


def _config_dir(root: Path, name: str = "llama8b", shape: dict[str, Any] = LLAMA8B) -> Path:
    """A shape's config.json and a small tokenizer, no weights (load_format='dummy')."""
    from kvik.testing.tiny_models import build_tokenizer
    from transformers import LlamaConfig

    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{**shape, **(SMOKE_SHAPE if DEVICE == "cpu" else {})}, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    build_tokenizer(512).save_pretrained(path)
    return path


def _timed(llm: Any, prompt: list[int], new: int) -> float:
    import torch
    from kvik import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == new
    return time.perf_counter() - t


# Offline workloads: (requests, prompt lengths U[lo, hi], new tokens each). "usual" is the issue's
# (1,000 requests, U[128, 1024] -> 256); "short" the first runs' smaller one.
WORKLOADS = {"short": (256, 128, 512, 128), "usual": (1000, 128, 1024, 256)}


def _offline_prompts(workload: str = "short") -> list[list[int]]:
    """The workload's prompts: random tokens (seeded)."""
    import numpy as np

    n, lo, hi, _ = WORKLOADS[workload]
    if DEVICE == "cpu":  # --smoke: the same flow, a toy amount of work
        n, lo, hi = 16, 16, 64
    rng = np.random.default_rng(1)
    return [rng.integers(3, 128000, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]


def _new_tokens(workload: str) -> int:
    return 16 if DEVICE == "cpu" else WORKLOADS[workload][3]


def _profile(llm: Any, batch: int, new: int = 32) -> dict[str, Any]:
    """Device time by kernel over ``batch`` requests decoding ``new`` tokens (after a 512-token prompt): the
    all-reduce's share of the step (NCCL kernels), per rank, and rank 0's largest kernels."""
    import numpy as np
    from kvik import SamplingParams

    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128000, 512).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)  # warm
    llm.start_profile()
    llm.generate(prompts, params, use_tqdm=False)
    summaries = llm.stop_profile()
    return {
        "batch": batch,
        "allreduce_share_per_rank": [round(s.share("nccl", "allreduce", "all_reduce"), 4) for s in summaries],
        "device_ms_per_rank": [round(s.device_us / 1e3, 2) for s in summaries],
        "wall_ms": round(summaries[0].wall_s * 1e3, 1),
        "rank0_top": [(k.name[:80], round(k.device_us / 1e3, 2), k.calls) for k in summaries[0].kernels[:8]],
    }


def bench_8b(path: Path, tp: int, eager: bool, kv_gib: int = 12, pp: int = 1, workload: str = "short",
             profile: bool = False, **extra: Any) -> dict[str, Any]:
    import numpy as np
    from kvik import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(path), device=DEVICE, dtype="bfloat16", load_format="dummy", tensor_parallel_size=tp,
              pipeline_parallel_size=pp, kv_cache_memory=(kv_gib << 30) if DEVICE == "cuda" else 64 << 20, max_model_len=2048, max_num_seqs=256,
              enforce_eager=eager, **extra)  # fmt: skip
    out: dict[str, Any] = {"start_s": round(time.perf_counter() - t0, 1)}
    try:
        rng = np.random.default_rng(0)
        best = float("inf")
        for _ in range(3):  # the first is the warm-up
            prompt = rng.integers(3, 128000, 512).tolist()
            one = _timed(llm, prompt, 1)
            prompt2 = rng.integers(3, 128000, 512).tolist()
            many = _timed(llm, prompt2, 129)
            best = min(best, (many - one) / 128 * 1e3)
        out["batch1_ms_per_token"] = round(best, 3)
        if profile:
            out["profile"] = [_profile(llm, batch) for batch in (1, 64)]
        prompts = _offline_prompts(workload)
        params = SamplingParams(max_tokens=_new_tokens(workload), temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        generated = sum(len(r.outputs[0].token_ids) for r in results)
        tag = "256x128" if workload == "short" else workload
        out[f"offline_{tag}_output_tok_per_s"] = round(generated / elapsed, 1)
        out["offline_total_tok_per_s"] = round((generated + sum(map(len, prompts))) / elapsed, 1)
        out["offline_s"] = round(elapsed, 1)
    finally:
        _shutdown(llm)
    return out


def bench_dp(path: Path, replicas: int, executor: str | None = None, workload: str = "usual") -> dict[str, Any]:
    """The offline workload through ``replicas`` engines behind the router, all requests submitted at once
    (each request's final output only, as a non-streaming server request gets it). ``executor="mp"`` runs
    every replica's rank in a worker process (by default the first replica's runs in this process)."""
    import asyncio

    from kvik import SamplingParams
    from kvik.engine.data_parallel import DataParallelLLM

    t0 = time.perf_counter()
    extra = {} if executor is None else {"distributed_executor_backend": executor}
    dp = DataParallelLLM.from_engine_args(replicas, model=str(path), device=DEVICE, dtype="bfloat16",
                                          load_format="dummy", kv_cache_memory=(40 << 30) if DEVICE == "cuda" else 64 << 20,
                                          max_model_len=2048, max_num_seqs=256, **extra)  # fmt: skip
    out: dict[str, Any] = {"replicas": replicas, "executor": executor or "default", "workload": workload,
                           "start_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    params = SamplingParams(max_tokens=_new_tokens(workload), temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind="final_only")  # fmt: skip

    async def one(prompt: list[int], rid: str) -> int:
        tokens = 0
        async for output in dp.generate(prompt, params, rid):
            tokens = len(output.outputs[0].token_ids)  # cumulative: the last output holds them all
        return tokens

    async def run(prompts: list[list[int]], tag: str) -> tuple[int, float]:
        t = time.perf_counter()
        counts = await asyncio.gather(*(one(p, f"{tag}{i}") for i, p in enumerate(prompts)))
        return sum(counts), time.perf_counter() - t

    async def main_() -> None:
        dp.start()
        try:
            await run(_offline_prompts()[:8], "warm")
            generated, elapsed = await run(_offline_prompts(workload), "r")
            out["offline_output_tok_per_s"] = round(generated / elapsed, 1)
            out["offline_s"] = round(elapsed, 1)
        finally:
            await dp.shutdown()

    asyncio.run(main_())
    return out


def main() -> int:
    import torch

    global DEVICE
    if "--smoke" in sys.argv:
        DEVICE = "cpu"

    summary: dict[str, Any] = {"gpus": torch.cuda.device_count(), "torch": torch.__version__}
    if summary["gpus"] < 2 and DEVICE == "cuda":
        summary["error"] = "needs 2 GPUs"
    parts = {"tokens", "llama8b", "dp2"}
    for i, arg in enumerate(sys.argv):
        if arg == "--parts" and i + 1 < len(sys.argv):
            parts = set(sys.argv[i + 1].split(","))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "tokens" in parts:
            try:
                summary["tokens"] = check_tokens(root)
            except Exception:
                summary["tokens_error"] = _error()
        dp_runs = [(1, None), (2, None)] if "dp2" in parts else []
        dp_runs += [(1, "mp"), (2, "mp")] if "dp_mp" in parts else []
        for replicas, executor in dp_runs:
            name = f"dp{replicas}" + (f"_{executor}" if executor else "")
            try:
                summary[name] = bench_dp(_config_dir(root), replicas, executor)
            except Exception:
                summary[name] = {"error": _error()}
            print(name, json.dumps(summary[name])[:400], flush=True)
        key = "offline_output_tok_per_s"
        for two, one in (("dp2", "dp1"), ("dp2_mp", "dp1"), ("dp1_mp", "dp1")):
            if key in summary.get(one, {}) and key in summary.get(two, {}):
                summary[f"{two}_over_{one}"] = round(summary[two][key] / summary[one][key], 3)
        if "llama70b" in parts:
            try:
                summary["llama70b_tp2"] = bench_8b(_config_dir(root, "llama70b", LLAMA70B), 2, False, kv_gib=45,
                                                   workload="usual", profile=True)  # fmt: skip
            except Exception:
                summary["llama70b_tp2"] = {"error": _error()}
            print("llama70b_tp2", json.dumps(summary["llama70b_tp2"])[:400], flush=True)
        if "llama8b" in parts:
            try:
                path = _config_dir(root)
                runs: dict[str, Any] = {}
                cases = [("tp1_graphs", 1, False, 1), ("tp2_graphs", 2, False, 1)]
                if "nccl" in parts:  # TP=2 with every sum through NCCL (no symmetric-memory all-reduce)
                    cases.append(("tp2_graphs_nccl", 2, False, 1))
                if "tp2_only" in parts:  # the TP=2 variants alone, NCCL first (an A/B of the all-reduce)
                    cases = sorted(cases[1:], key=lambda case: not case[0].endswith("_nccl"))
                if "eager" in parts:
                    cases += [("tp2_eager", 2, True, 1), ("tp1_eager", 1, True, 1)]
                if "pp2" in parts:  # two stages, two micro-batches in flight (eager: no graphs under PP)
                    if "eager" not in parts:  # its baseline
                        cases.append(("tp1_eager", 1, True, 1))
                    cases.append(("pp2_eager", 1, True, 2))
                workload = "usual" if "usual" in parts else "short"
                for name, tp, eager, pp in cases:
                    if time.perf_counter() - started > 420:  # stay inside the 8-minute budget
                        runs[name] = "skipped: time budget"
                        continue
                    try:
                        extra = {"disable_custom_all_reduce": True} if name.endswith("_nccl") else {}
                        runs[name] = bench_8b(path, tp, eager, pp=pp, kv_gib=40 if workload == "usual" else 12,
                                              workload=workload, profile=name.startswith("tp2_graphs"), **extra)  # fmt: skip
                    except Exception:
                        runs[name] = {"error": _error()}
                    print(name, json.dumps(runs[name])[:400], flush=True)
                summary["llama8b"] = runs
                pp2, tp1 = runs.get("pp2_eager"), runs.get("tp1_eager")
                key = "offline_256x128_output_tok_per_s" if workload == "short" else f"offline_{workload}_output_tok_per_s"
                if isinstance(pp2, dict) and isinstance(tp1, dict) and key in pp2 and key in tp1:
                    summary["pp2_over_tp1_offline_eager"] = round(pp2[key] / tp1[key], 3)
                for mode in ("graphs", "eager"):
                    one, two = runs.get(f"tp1_{mode}"), runs.get(f"tp2_{mode}")
                    key = "batch1_ms_per_token"
                    if isinstance(one, dict) and isinstance(two, dict) and key in one and key in two:
                        summary[f"tp2_over_tp1_batch1_{mode}"] = round(two[key] / one[key], 3)
            except Exception:
                summary["llama8b_error"] = _error()
    summary["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tp_benchmark.json").write_text(text)
    return 0


if __name__ == "__main__":  # the multiprocess executor starts its workers from this module's children
    sys.exit(main())
