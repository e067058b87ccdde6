"""Host time per decode step of the real engine loop, with the model forward replaced by a stand-in.

On the H200 the SmolLM2 shape is host-bound (docs/benchmarks.md): its batch-256 decode graph replays
in ~1.1 ms, so every millisecond of Python per step is GPU idle time. This harness measures that
Python on any machine. It runs the real ``LLMEngine.step()`` loop (scheduler, block-table deltas,
``StepLayout`` written into the CUDA runner's pinned-buffer layout, its input copies, the sampler,
the step's output copy and ``assemble_output``, ``update_from_output``, the output processor with
detokenization off) through the CUDA platform's runner on the CPU, with two stand-ins:

* ``run_model`` returns a fixed hidden-state tensor (no forward);
* ``compute_logits`` returns fixed logits ``[rows, vocab]`` (no lm_head).

Decode buckets are marked as captured, as on a GPU with CUDA graphs, so a decode step skips the
attention backend's per-step plan exactly as a graph replay does. ``--vocab`` sets the stand-in
logits' width: it only scales the sampler's device kernels (which run synchronously on a CPU), not
host work, so it defaults small; pass 49152 to see SmolLM2's full vocabulary.

Phases per decode step (ms of this thread's CPU time by default, ``--clock wall`` for wall time; mean over
the measured steps; torch runs single-threaded here, so the step's work is all on this thread):
  schedule   Scheduler.schedule + structured.start_step
  prepare    block-table deltas + StepLayout + prepare_inputs (copies into the device buffers)
  model      the stand-in forward (~0)
  sample     logits rows, SamplingBatch, sampler, start of the output copy
  outputs    wait + assemble_output, update_from_output, grammar accept, OutputProcessor.process
  other      the rest of LLMEngine.step

    python benchmarks/host_overhead.py --running 64,256 --steps 200
    python benchmarks/host_overhead.py --running 256 --profile   # + cProfile's top functions
    PROFILE_SORT=cumulative python benchmarks/host_overhead.py --running 256 --profile   # by cumulative time
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kvik.entrypoints.frozen_heap import frozen_heap
from kvik.plugins.hookspecs import hookimpl
from kvik_cuda.testing import HostCUDAPlatform  # the CUDA platform's runner on the CPU

KVIK_PLUGIN_API = ">=2.0,<3"
PHASES = ("schedule", "prepare", "model", "sample", "outputs", "other")


def _graph_backend() -> type:
    """torch_ref declaring CUDA-graph support, as the GPU's Triton backend does: decode steps get
    bucketed (padded) and, with the buckets marked captured, skip the per-step plan."""
    from kvik.attention.torch_ref import TorchRefAttentionBackend

    return type("GraphCapableTorchRef", (TorchRefAttentionBackend,), {"name": GRAPH_BACKEND, "supports_cuda_graphs": True})


GRAPH_BACKEND = "host-overhead-graphs"


def __getattr__(name: str) -> Any:  # "module:GraphCapableTorchRef" for the registry, built lazily
    if name == "GraphCapableTorchRef":
        return _graph_backend()
    raise AttributeError(name)


@hookimpl
def kvik_register_platforms(register: Callable[[str, str], None]) -> None:
    register(HostCUDAPlatform.name, "kvik_cuda.testing:HostCUDAPlatform")


@hookimpl
def kvik_register_attention_backends(register: Callable[[str, str], None]) -> None:
    register(GRAPH_BACKEND, f"{__name__}:GraphCapableTorchRef")


class Timers:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        """Time ``obj.name`` (an instance attribute shadows the method) into ``phase``."""
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[phase] += self.clock() - start

        setattr(obj, name, timed)


def build_engine(args: argparse.Namespace, running: int, root: Path) -> Any:
    from kvik.config import EngineConfig
    from kvik.engine.llm_engine import LLMEngine
    from kvik.plugins.manager import get_plugin_manager
    from kvik.testing.tiny_models import make_tiny_model

    path = root / f"model-v{args.vocab}"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch="llama", vocab_size=args.vocab, max_position_embeddings=8192)
    manager = get_plugin_manager()  # the runner looks its attention backend up in the process-wide one
    if not manager.pm.has_plugin("host-overhead"):
        manager.register(sys.modules[__name__], "host-overhead", "benchmarks")
    bs = args.block_size
    max_len = args.prompt_len + args.warmup + args.steps + 64  # prefill steps sample too
    blocks = running * -(-max_len // bs) + 16
    cfg = EngineConfig(
        model=str(path),
        device=HostCUDAPlatform.name,
        dtype="float32",
        block_size=bs,
        max_model_len=max_len,
        max_num_seqs=running,
        max_num_batched_tokens=max(args.batched_tokens, running),
        num_kv_blocks=blocks,
        enable_prefix_caching=False,  # random prompts share nothing; the hashes still cost prefill time
        async_scheduling=not args.sync,
        attention_backend=args.attention,  # the GPU's backend: it supports graphs, so decode steps are bucketed
    )
    engine = LLMEngine(cfg, manager)
    runner = engine.runner
    hidden = torch.zeros(cfg.max_num_batched_tokens + running, engine.model_config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(cfg.max_num_batched_tokens + running, args.vocab, generator=gen)
    runner.run_model = lambda inputs: hidden[: inputs.input_ids.shape[0]]
    runner.model.compute_logits = lambda h: logits[: h.shape[0]]
    # As with captured CUDA graphs: a bucketed decode step replays, skipping the backend's plan.
    shapes = [(size, size) for size in runner.sizes] + list(getattr(runner, "verify_shapes", []))
    runner.graphs = dict.fromkeys(shapes)  # (requests, tokens) of the decode and verify buckets
    return engine


def instrument(engine: Any, timers: Timers) -> None:
    runner = engine.runner
    timers.wrap(engine, "_schedule", "schedule")
    timers.wrap(runner.block_tables, "apply", "prepare")
    timers.wrap(runner, "build_layout", "prepare")
    timers.wrap(runner, "prepare_inputs", "prepare")
    timers.wrap(runner, "run_model", "model")
    timers.wrap(runner, "sample", "sample")
    timers.wrap(engine, "_finish", "outputs")
    timers.wrap(engine, "step", "total")


def measure(args: argparse.Namespace, running: int, root: Path) -> dict[str, Any]:
    """Prefill ``running`` requests, run ``warmup`` decode steps, then time ``steps`` decode steps."""
    engine = build_engine(args, running, root)
    # As LLM.generate runs its steps: the heap built so far frozen, so full collections do not walk it
    # (unfrozen, one in about three rounds of 100 steps took ~0.2 s inside the scheduler's phase).
    with frozen_heap():
        return _measure(args, running, engine)


def _measure(args: argparse.Namespace, running: int, engine: Any) -> dict[str, Any]:
    import random

    from kvik import SamplingParams

    rng = random.Random(0)
    params = SamplingParams(
        max_tokens=args.warmup + args.steps + 48,
        temperature=args.temperature,
        ignore_eos=True,
        detokenize=False,
        output_kind=args.output_kind,
    )
    for i in range(running):
        engine.add_request(f"r{i}", [rng.randrange(1, args.vocab) for _ in range(args.prompt_len)], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    assert len(engine.scheduler.running) == running, "every request must be running for the measurement"
    timers = Timers(time.thread_time if args.clock == "cpu" else time.perf_counter)
    instrument(engine, timers)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    for _ in range(args.steps):
        engine.step()
    if profiler is not None:
        profiler.disable()
    assert len(engine.scheduler.running) == running
    t = timers.total
    per_step = {p: 1e3 * t[p] / args.steps for p in PHASES if p != "other"}
    per_step["other"] = 1e3 * t["total"] / args.steps - sum(per_step.values())
    per_step["total"] = 1e3 * t["total"] / args.steps
    result: dict[str, Any] = {"running": running, "steps": args.steps, "ms_per_step": per_step}
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(args.profile_top)
        result["profile"] = out.getvalue()
    engine.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", default="64,256", help="comma-separated running-request counts")
    parser.add_argument("--steps", type=int, default=200, help="measured decode steps per count")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="measure each count this many times, alternating")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batched-tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=512, help="stand-in logits width (device work only)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as in the GPU benchmarks")
    parser.add_argument("--attention", default=GRAPH_BACKEND, help="attention backend (its per-step plan is skipped)")
    parser.add_argument(
        "--output-kind", default="final_only", help="final_only (LLM.generate, the GPU benchmarks) or cumulative"
    )
    parser.add_argument("--sync", action="store_true", help="async scheduling off")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this thread's CPU time (robust on a shared machine: time spent waiting for a core is not "
        "counted); wall: perf_counter",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps")
    parser.add_argument("--profile-top", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(c) for c in args.running.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for running in counts:
                r = measure(args, running, Path(tmp))
                r["repeat"] = repeat
                results.append(r)
                ms = r["ms_per_step"]
                print(
                    f"running={running:4d} " + " ".join(f"{p}={ms[p]:.3f}" for p in (*PHASES, "total")) + " ms/step",
                    flush=True,
                )
                if "profile" in r:
                    print(r["profile"])
    summary = {"args": vars(args) | {"json": str(args.json)}, "results": results}
    out_dir = os.environ.get("OUT")
    for target in [args.json] + ([Path(out_dir) / "host_overhead.json"] if out_dir else []):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
