"""Offline throughput of kvik on this CPU: the apple platform (MLX's CPU build) vs the cpu platform (PyTorch).

    python benchmarks/mlx_vs_torch_cpu.py --shape smollm2-135m --num-requests 8 --input-len 16:64 --output-len 32

Same random-weight model, same prompts, same engine settings; each device runs
in its own process. Prints a table of output tokens/s (and total tokens/s);
--json-out saves it. The apple platform's real target is Metal on Apple
Silicon: on Linux MLX runs on its CPU build, whose wheel multiplies matrices
with a bundled reference BLAS, so this measures that build, not a Mac.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import build_model, peak_rss_mib, print_table, run_isolated, workload


def _run_one(args: argparse.Namespace) -> dict:
    """Runs inside the child process: one device, one workload; prints a JSON line."""
    import torch
    from kvik import LLM, SamplingParams

    torch.set_num_threads(args.num_threads)
    model = Path(args.model)
    config = json.loads((model / "config.json").read_text())
    prompts = workload(args.num_requests, args.input_range, config["vocab_size"], seed=args.seed)
    start = time.perf_counter()
    llm = LLM(
        str(model), device=args.device, dtype="float32", max_num_seqs=args.num_requests, num_kv_blocks=args.num_kv_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.num_threads, max_model_len=1024,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm-up
    llm.llm_engine.scheduler.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    return {
        "device": args.device,
        "runtime": _runtime(args.device),
        "requests": len(prompts),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "seconds": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (in_tokens + out_tokens) / elapsed,
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "first_tokens": [o.outputs[0].token_ids[:8] for o in outputs],
    }


def _runtime(device: str) -> str:
    if device == "apple":
        import mlx.core as mx

        return f"mlx {mx.__version__} ({mx.default_device()})"
    import torch

    return f"torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help="random-weight model shape from common.SHAPES")
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--input-len", default="16:64", help="min:max prompt tokens")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=2, help="torch threads (MLX manages its own)")
    parser.add_argument("--num-kv-blocks", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--devices", default="apple,cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mlx-preload",
        help="also run the apple device with this BLAS library LD_PRELOADed (e.g. an OpenBLAS libopenblas.so.0), "
        "to show how much of MLX's CPU-build speed is its bundled reference BLAS",
    )
    parser.add_argument("--json-out")
    # internal: the child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    low, _, high = args.input_len.partition(":")
    args.input_range = (int(low), int(high or low))
    if args.child:
        print(json.dumps(_run_one(args)))
        return

    root = Path(tempfile.gettempdir()) / "kvik_bench_models"
    model = build_model(args.shape, root)
    rows = []
    runs = [(device, None) for device in args.devices.split(",")]
    if args.mlx_preload:
        runs.append(("apple", args.mlx_preload))
    for device, preload in runs:
        argv = [__file__, "--child", "--device", device, "--model", str(model)]
        for name in ("num_requests", "input_len", "output_len", "num_threads", "num_kv_blocks",
                     "max_num_batched_tokens", "seed"):  # fmt: skip
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        print(f"running {device}{' with ' + preload if preload else ''} ...", file=sys.stderr, flush=True)
        saved = dict(os.environ)
        if preload:  # the child inherits the environment; single-threaded like the bundled BLAS
            os.environ.update(LD_PRELOAD=preload, OPENBLAS_NUM_THREADS="1")
        try:
            row = run_isolated(argv)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if preload:
            row["runtime"] += f" + {Path(preload).name}"
        rows.append(row)
    same = len({json.dumps(r.pop("first_tokens")) for r in rows}) == 1
    print(f"\nshape {args.shape}, {args.num_requests} requests, input {args.input_len}, output {args.output_len}, "
          f"greedy; machine: {platform.machine()} {platform.processor() or ''}".rstrip())  # fmt: skip
    print_table(rows, ["device", "runtime", "output_tokens", "seconds", "output_tok_s", "total_tok_s", "load_s",
                       "peak_rss_mib"])  # fmt: skip
    print(f"first 8 greedy tokens identical across devices: {same}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows, "same_tokens": same}, indent=2))


if __name__ == "__main__":
    main()
