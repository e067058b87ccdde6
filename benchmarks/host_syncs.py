"""Where the engine's host thread waits for the GPU during offline generation (issue 21: "name what blocks the
launch path").

With async scheduling the host should wait for the GPU at exactly one place per step: the previous step's
sampled tokens (``StepHandle.result``). Any other synchronizing CUDA call on the step path (a ``.item()``, a
``.tolist()`` of a device tensor, a blocking copy, ``nonzero``, an allocator sync) stalls the launch of the
next step behind the step in flight. torch's sync debug mode reports each such call; this script runs
``LLM.generate`` on a random-weight checkpoint with it on (after a warm-up, so graph capture does not count),
records the Python stack of every report, and prints them grouped by the innermost kvik frame, with the phase
times of the run (``launch`` = ``execute_async``, ``wait`` = the intended wait for samples).

    python3 benchmarks/host_syncs.py --shape smollm2 --n 256 --out-len 32   # H200: ~1 min; $OUT/host_syncs.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def innermost_kvik_frames(stack: list[traceback.FrameSummary], depth: int = 3) -> str:
    """The ``depth`` innermost frames inside kvik's packages (not this script, not torch), innermost first."""
    frames = [f for f in stack if "/kvik" in f.filename and "benchmarks/" not in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out-len", type=int, default=32)
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--cprofile", action="store_true", help="also: cProfile of a second run, top host functions")
    args = ap.parse_args()

    import kvik
    import torch
    from gpu_common import SHAPES, workload, write_random_checkpoint
    from gpu_offline import PhaseTimer
    from kvik import SamplingParams

    path = write_random_checkpoint(args.shape, Path(args.root))
    llm = kvik.LLM(model=str(path), dtype="bfloat16", max_model_len=2048, max_num_seqs=256,
                   gpu_memory_utilization=0.85)  # fmt: skip
    vocab = SHAPES[args.shape]["vocab_size"]
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(64, vocab, seed=5), params, use_tqdm=False)  # warm-up: compiles and captures
    timer = PhaseTimer(llm.llm_engine)
    runner = llm.llm_engine.runner
    launch = runner.execute_async
    launch_ms: dict[str, list[float]] = {"decode": [], "other": []}

    def timed_launch(scheduler_output: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        handle = launch(scheduler_output, *a, **kw)
        decode = all(len(r.token_ids) == 1 for r in scheduler_output.scheduled)
        launch_ms["decode" if decode else "other"].append((time.perf_counter() - t) * 1e3)
        return handle

    runner.execute_async = timed_launch
    sites: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        site = innermost_kvik_frames(stack) or f"{filename}:{lineno}"
        sites[site] += 1
        examples.setdefault(site, f"{message} | " + " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-8:])))  # fmt: skip

    prompts = workload(args.n, vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    result = {
        "shape": args.shape,
        "n": args.n,
        "out_len": args.out_len,
        "wall_s": round(wall, 2),
        "steps": timer.steps,
        "phase_s": {k: round(v, 3) for k, v in timer.seconds.items()},
        # Host ms of each step's launch (execute_async), decode-only steps apart: a launch that waits for the
        # step in flight shows here although no synchronizing call is reported.
        "launch_ms_median": {k: round(statistics.median(v), 3) for k, v in launch_ms.items() if v},
        "launch_steps": {k: len(v) for k, v in launch_ms.items()},
        "syncs_total": sum(sites.values()),
        "syncs_per_step": round(sum(sites.values()) / max(1, timer.steps), 2),
        "sites": dict(sites.most_common()),
        "examples": examples,
    }
    if args.cprofile:  # a second run without the debug mode, under cProfile: where the host's time goes
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        llm.generate(prompts, params, use_tqdm=False)
        profiler.disable()
        torch.cuda.synchronize()
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(45)
            result[f"cprofile_{order}"] = text.getvalue()
            print(text.getvalue())
    out = Path(os.environ.get("OUT", "/tmp")) / f"host_syncs_{args.shape}.json"
    out.write_text(json.dumps(result, indent=1))
    print("RESULT", json.dumps(result)[:6000])


if __name__ == "__main__":
    main()
