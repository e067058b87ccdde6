"""Offline throughput of kvik on a GPU, on the peers' workload (see docs/benchmarks.md, "GPU").

    python benchmarks/gpu_offline.py --shape llama8b --n 1000 [--variants async,sync,no_prefix_cache]
        [--latency] [--profile] [--prefix]

A random-weight bf16 checkpoint of the shape is written on the GPU machine's disk
(once), then kvik.LLM generates ``--out-len`` tokens for each of ``--n`` random-token
prompts (lengths uniform in [128, 1024], the peers' seed), greedy, EOS ignored,
without detokenization. Records go to $OUT/offline_<shape>.jsonl: throughput,
engine-phase times (schedule / execute / update / output), MFU and the decode
bandwidth bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import (
    SHAPES,
    Recorder,
    kv_bytes_per_token,
    sync,
    weight_bytes,
    workload,
    write_random_checkpoint,
)
from gpu_latency import measure_latency

PEAK_BF16 = 989e12  # H100 SXM dense bf16, datasheet (the measured GEMM ceiling here is ~746-798 TFLOP/s)


class PhaseTimer:
    """Attributes wall time to the engine's step phases.

    ``launch`` queues a step on the GPU, ``wait`` blocks for a step's samples (GPU
    time not hidden behind host work), the rest is host work. A decode step's time
    is the interval between its launch and the next one (the loop's period).
    """

    def __init__(self, engine: Any) -> None:
        from kvik.worker import interface

        self.seconds: dict[str, float] = defaultdict(float)
        self.launches: list[tuple[float, bool]] = []  # (time, decode-only)
        self._wrap(engine, "_schedule", "schedule")
        self._wrap(engine.runner, "execute_async", "launch", count=True)
        self._wrap(interface.StepHandle, "result", "wait")
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(engine.output_processor, "process", "process")

    def _wrap(self, obj: Any, name: str, label: str, count: bool = False) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            if count:
                self.launches.append((t, all(len(r.token_ids) == 1 for r in args[0].scheduled)))
            result = inner(*args, **kwargs)
            self.seconds[label] += time.perf_counter() - t
            return result

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.launches.clear()

    @property
    def steps(self) -> int:
        return len(self.launches)

    def decode_periods(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.launches, self.launches[1:], strict=False) if a[1] and b[1]]


def run(args: argparse.Namespace) -> None:
    import kvik
    import torch
    from gpu_common import measure_ceilings
    from kvik import SamplingParams

    record = Recorder(f"offline_{args.shape}")
    ceilings = measure_ceilings() if args.device == "cuda" else {"copy_bytes_per_s": 3.0e12, "bf16_gemm_flops": 7.5e14}
    path = write_random_checkpoint(args.shape, Path(args.root), device=args.device)
    t0 = time.perf_counter()
    llm = kvik.LLM(
        model=str(path),
        device=args.device,
        dtype="bfloat16",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    engine = llm.llm_engine
    record(
        event="engine",
        shape=args.shape,
        init_s=round(time.perf_counter() - t0, 1),
        memory_plan=engine.memory_plan.summary(),
        graphs=len(getattr(engine.runner, "graphs", {})),
        piecewise_sizes=len(getattr(engine.runner, "piecewise_graphs", {})),
        attention=engine.runner.attn_backend.name,
        async_scheduling=engine.async_scheduling,
        device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        copy_tb_s=round(ceilings["copy_bytes_per_s"] / 1e12, 2),
        bf16_gemm_tflops=round(ceilings["bf16_gemm_flops"] / 1e12, 1),
        platform=engine.platform.describe(),
    )
    vocab = SHAPES[args.shape]["vocab_size"]
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(16, vocab, seed=5), warm, use_tqdm=False)  # compile the prefill kernels

    timer = PhaseTimer(engine)
    prompts = workload(args.n, vocab)
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    prompt_tokens = sum(len(p) for p in prompts)
    out_tokens = args.n * args.out_len
    flops = 2 * weight_bytes(args.shape) / 2 * (prompt_tokens + out_tokens)  # 2 FLOPs per weight per token
    # A full decode step reads the weights once plus each running request's KV.
    mean_ctx = prompt_tokens / args.n + args.out_len / 2
    floor_bytes = weight_bytes(args.shape) + args.max_num_seqs * mean_ctx * kv_bytes_per_token(args.shape)
    floor_ms = floor_bytes / ceilings["copy_bytes_per_s"] * 1e3
    overlap = engine.async_scheduling
    piecewise_sizes = list(getattr(engine.runner, "piecewise_sizes", []))
    for variant in args.variants.split(","):
        # Variants switch the loaded engine in place; the prefix cache is emptied so every
        # variant sees the same 0%-hit workload.
        engine.async_scheduling = overlap and variant != "sync"
        # no_piecewise: prefill and mixed steps eager and unpadded (the piecewise graphs stay captured).
        engine.runner.piecewise_sizes = [] if variant == "no_piecewise" else piecewise_sizes
        engine.scheduler.kv_cache.enable_prefix_caching = variant != "no_prefix_cache"
        engine.scheduler.reset_prefix_cache()
        timer.reset()
        before = engine.get_stats()
        replays_before = getattr(engine.runner, "piecewise_replays", 0)
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == args.out_len for o in outs)
        periods = timer.decode_periods()
        decode_step_ms = sum(periods) / max(1, len(periods)) * 1e3
        record(
            event="offline",
            shape=args.shape,
            variant=variant,
            async_scheduling=engine.async_scheduling,
            prefix_caching=engine.scheduler.kv_cache.enable_prefix_caching,
            n=args.n,
            out_len=args.out_len,
            enforce_eager=args.enforce_eager,
            wall_s=round(wall, 2),
            out_tok_s=round(out_tokens / wall, 1),
            total_tok_s=round((prompt_tokens + out_tokens) / wall, 1),
            prompt_tokens=prompt_tokens,
            steps=timer.steps,
            decode_steps=len(periods),
            mean_decode_step_ms=round(decode_step_ms, 2),
            decode_step_floor_ms_at_max_batch=round(floor_ms, 2),
            mfu_vs_989=round(flops / wall / PEAK_BF16, 4),
            fraction_of_measured_gemm=round(flops / wall / ceilings["bf16_gemm_flops"], 4),
            phase_s={k: round(v, 2) for k, v in timer.seconds.items()},
            prefix_cache_hit_rate=round(_hit_rate(engine, before), 4),
            piecewise_replays=getattr(engine.runner, "piecewise_replays", 0) - replays_before,
        )
    engine.async_scheduling = overlap
    engine.runner.piecewise_sizes = piecewise_sizes
    engine.scheduler.kv_cache.enable_prefix_caching = True
    if args.profile:
        profile(llm, prompts[:32], "warm-up", None)  # the profiler's own start-up is not the engine's
        for variant in ("async", "sync") if overlap else ("sync",):
            engine.async_scheduling = variant == "async"
            profile(llm, prompts[:256], variant, record)
        engine.async_scheduling = overlap
    if args.prefix:
        prefix_sharing(llm, args.shape, record)
    if args.latency:
        measure_latency(llm, args.shape, Recorder(f"latency_{args.shape}"))


def _hit_rate(engine: Any, before: Any) -> float:
    """Prefix-cache hit rate since the ``before`` stats (the engine's counters are cumulative)."""
    now = engine.get_stats()
    queries = now.prefix_cache_queries - before.prefix_cache_queries
    return (now.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0


def prefix_sharing(
    llm: Any,
    shape: str,
    record: Recorder,
    system_len: int = 1000,
    user_len: int = 32,
    batch: int = 512,
    singles: int = 32,
) -> None:
    """A shared 1,000-token system prompt: TTFT at batch 1 and throughput, prefix cache on vs off."""
    from kvik import SamplingParams

    engine = llm.llm_engine
    vocab = SHAPES[shape]["vocab_size"]
    system = workload(1, vocab, system_len, system_len, seed=21)[0]
    users = workload(1 + singles + batch, vocab, user_len, user_len, seed=22)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True, detokenize=False)
    for caching in (True, False):
        engine.scheduler.kv_cache.enable_prefix_caching = caching
        engine.scheduler.reset_prefix_cache()
        before = engine.get_stats()
        llm.generate([system + users[0]], first, use_tqdm=False)  # the system prompt enters the cache
        ttft = []
        for user in users[1 : 1 + singles]:
            sync()
            t = time.perf_counter()
            llm.generate([system + user], first, use_tqdm=False)
            sync()
            ttft.append(time.perf_counter() - t)
        prompts = [system + u for u in users[1 + singles :]]
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t
        waits = sorted(o.metrics.first_token_time - o.metrics.arrival_time for o in outs)
        record(
            event="prefix_sharing",
            shape=shape,
            prefix_caching=caching,
            system_tokens=system_len,
            user_tokens=user_len,
            batch1_ttft_ms_median=round(sorted(ttft)[len(ttft) // 2] * 1e3, 2),
            batch_requests=len(prompts),
            batch_out_tok_s=round(len(prompts) * 128 / wall, 1),
            batch_wall_s=round(wall, 2),
            batch_ttft_s_p50=round(waits[len(waits) // 2], 3),
            hit_rate=round(_hit_rate(engine, before), 3),
        )
    engine.scheduler.kv_cache.enable_prefix_caching = True


def profile(llm: Any, prompts: list[list[int]], variant: str, record: Recorder | None) -> None:
    """torch.profiler over a short run (256 requests x 64 tokens): top CUDA kernels and the GPU's idle share.

    GPU busy time is the sum of kernel and copy times (one stream, so they do not
    overlap); idle = 1 - busy / wall, the time the GPU waited for the host.
    """
    from kvik import SamplingParams
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        sync()
    wall = time.perf_counter() - t
    if record is None:
        return
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table, flush=True)
    gpu_us = sum(e.self_device_time_total for e in events)
    record(
        event="profile",
        variant=variant,
        wall_s=round(wall, 2),
        gpu_busy_s=round(gpu_us / 1e6, 2),
        gpu_idle_fraction=round(1 - gpu_us / 1e6 / wall, 3),
        top=[
            (e.key[:60], round(e.self_device_time_total / 1e3, 1), e.count)
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--device", default="cuda", help="'cpu' only for smoke-testing the script")
    ap.add_argument("--latency", action="store_true", help="also measure batch-1 decode latency")
    ap.add_argument("--profile", action="store_true", help="also profile a short run with torch.profiler")
    ap.add_argument(
        "--variants",
        default="async",
        help="comma-separated runs of the workload on the loaded engine: async (the default engine), "
        "sync (async scheduling off), no_prefix_cache, no_piecewise (prefill and mixed steps eager)",
    )
    ap.add_argument("--prefix", action="store_true", help="also run the shared-system-prompt prefix-cache benchmark")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
