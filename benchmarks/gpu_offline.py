"""Offline throughput of kvik on a GPU, on the peers' workload (see docs/benchmarks.md, "GPU").

    python benchmarks/gpu_offline.py --shape llama8b --n 1000 [--latency] [--profile]

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
    """Wraps the engine's step phases to attribute wall time (execute includes the GPU wait)."""

    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self._wrap(engine.scheduler, "schedule")
        self._wrap(engine.runner, "execute", count=True)
        self._wrap(engine.scheduler, "update_from_output")
        self._wrap(engine.output_processor, "process")

    def _wrap(self, obj: Any, name: str, count: bool = False) -> None:
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            result = inner(*args, **kwargs)
            dt = time.perf_counter() - t
            self.seconds[name] += dt
            if count:
                self.steps += 1
                if all(len(r.token_ids) == 1 for r in args[0].scheduled):
                    self.decode_steps += 1
                    self.decode_seconds += dt
            return result

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.steps = self.decode_steps = 0
        self.decode_seconds = 0.0


def run(args: argparse.Namespace) -> None:
    import kvik
    import torch
    from kvik import SamplingParams

    record = Recorder(f"offline_{args.shape}")
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
        attention=engine.runner.attn_backend.name,
        device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        platform=engine.platform.describe(),
    )
    vocab = SHAPES[args.shape]["vocab_size"]
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(16, vocab, seed=5), warm, use_tqdm=False)  # compile the prefill kernels

    timer = PhaseTimer(engine)
    prompts = workload(args.n, vocab)
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == args.out_len for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    out_tokens = args.n * args.out_len
    flops = 2 * weight_bytes(args.shape) / 2 * (prompt_tokens + out_tokens)  # 2 FLOPs per weight per token
    decode_step_ms = timer.decode_seconds / max(1, timer.decode_steps) * 1e3
    # A full decode step reads the weights once plus each running request's KV.
    mean_ctx = prompt_tokens / args.n + args.out_len / 2
    floor_ms = (weight_bytes(args.shape) + args.max_num_seqs * mean_ctx * kv_bytes_per_token(args.shape)) / 3.0e12 * 1e3
    record(
        event="offline",
        shape=args.shape,
        n=args.n,
        out_len=args.out_len,
        enforce_eager=args.enforce_eager,
        wall_s=round(wall, 2),
        out_tok_s=round(out_tokens / wall, 1),
        total_tok_s=round((prompt_tokens + out_tokens) / wall, 1),
        prompt_tokens=prompt_tokens,
        steps=timer.steps,
        decode_steps=timer.decode_steps,
        mean_decode_step_ms=round(decode_step_ms, 2),
        decode_step_floor_ms_at_max_batch=round(floor_ms, 2),
        mfu_vs_989=round(flops / wall / PEAK_BF16, 4),
        phase_s={k: round(v, 2) for k, v in timer.seconds.items()},
        stats=str(engine.get_stats()),
    )
    if args.profile:
        profile(llm, prompts[:256], vocab, record)
    if args.latency:
        measure_latency(llm, args.shape, Recorder(f"latency_{args.shape}"))


def profile(llm: Any, prompts: list[list[int]], vocab: int, record: Recorder) -> None:
    """torch.profiler over a short run (256 requests x 64 tokens): top CUDA kernels and CPU vs GPU time."""
    from kvik import SamplingParams
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        sync()
    wall = time.perf_counter() - t
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table, flush=True)
    gpu_us = sum(e.self_device_time_total for e in events)
    record(
        event="profile",
        wall_s=round(wall, 2),
        gpu_busy_s=round(gpu_us / 1e6, 2),
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
    run(ap.parse_args())


if __name__ == "__main__":
    main()
