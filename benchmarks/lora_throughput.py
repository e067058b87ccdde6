"""Multi-LoRA throughput on a GPU: the 8B shape, rank-16 adapters on every linear layer, against the base model.

    python3 -m pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton
    python3 benchmarks/lora_throughput.py                 # the short default run (~5 min on an H200)
    python3 benchmarks/lora_throughput.py --n 1000        # the issue's 1,000-request workload
    python3 benchmarks/lora_throughput.py --profile       # also a batch-1 decode window's kernel times

Weights are random (``load_format="dummy"``: only a config and a tokenizer are written) and so
are the adapters (one adapter's files, linked under 64 names: the engine loads, slots and swaps
each as its own). Parts, each in its own ``try`` so one failure keeps the others' results:

1. ``kernels``: the Triton shrink/expand kernels against the torch reference on the 8B projections
   (q/k/v fused, gate/up fused, o, down) at 1..256 tokens with mixed slots (grouped by adapter, as
   the scheduler orders them; the SGMV tile map cut once, as per step), and their time next to
   the base projection's matmul;
2. ``base``: the base model alone (enable_lora off), output tok/s, and batch-1 decode latency;
3. ``lora8``: one engine with ``max_loras=8``: base requests in it, requests spread uniformly over
   1, 8 and 64 adapters (64 means swapping), and batch-1 decode latency under one adapter;
4. ``lora64``: ``max_loras=64``, requests over 64 adapters;
5. ``load``: one 8B rank-16 adapter's way into a slot without the model (``benchmarks/lora_load.py``):
   the background read, and what the engine step pays to fill a slot from it (host time and with its
   copies landed), against reading on the step.

The throughput runs also report ``slot_load_s``: the engine thread's seconds in slot fills, of which
``slot_wait_s`` waiting for background reads and ``slot_read_s`` reading on the step.
With ``--profile``, ``lora8`` also profiles 33 batch-1 tokens (``LLM.start_profile``) under the adapter
and under the base model in the same engine: ``batch1_profile_adapter`` / ``batch1_profile_base``, the
top kernels as (name, device µs, calls), so the adapter's batch-1 overhead shows kernel by kernel; and
``base`` and ``lora64`` profile an offline run of the first 96 prompts after their timed run
(``offline_profile``), so the 64 adapters' offline cost shows kernel by kernel beside the base's.

Prints one JSON summary (ratios to the base included) and writes it to $OUT/lora_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import SHAPES, profile_record, workload

RESULTS: dict[str, Any] = {"parts": {}, "errors": {}}


def part(name: str):  # type: ignore[no-untyped-def]
    """Run a part, keep its result or its error, and never let it stop the others."""

    def wrap(fn):  # type: ignore[no-untyped-def]
        def run(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                RESULTS["parts"][name] = fn(*args)
            except Exception as exc:
                RESULTS["errors"][name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
            return RESULTS["parts"].get(name)

        return run

    return wrap


def write_model_dir(root: Path, shape: str) -> Path:
    from gpu_common import dummy_model_dir

    return dummy_model_dir(root, shape)


def write_adapters(root: Path, model_dir: Path, rank: int, count: int) -> list[str]:
    """One random rank-``rank`` adapter on every linear layer, linked under ``count`` directory names."""
    from kvik.testing.tiny_lora import write_random_adapter
    from transformers import AutoConfig

    first = root / "adapter0"
    if not (first / "adapter_model.safetensors").exists():
        write_random_adapter(first, AutoConfig.from_pretrained(model_dir), rank=rank, seed=0, std=0.01)
    paths = [str(first)]
    for i in range(1, count):
        path = root / f"adapter{i}"
        path.mkdir(exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (path / name).exists():
                os.symlink(first / name, path / name)
        paths.append(str(path))
    return paths


@part("kernels")
def bench_kernels(shape: str) -> dict[str, Any]:
    import torch
    import triton.testing
    from kvik.lora.compute import add_lora_reference
    from kvik_cuda.lora_kernels import TritonLoRA

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1

    def timed(fn: Any) -> float:
        return float(triton.testing.do_bench(fn, rep=50)) if device == "cuda" else float("nan")

    s = SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    projections = {"qkv": (h, (q, kv, kv)), "o": (q, (h,)), "gate_up": (h, (inter, inter)), "down": (inter, (h,))}
    rank, slots_n, out = 16, 8, {}
    for name, (in_f, shards) in projections.items():
        total = sum(shards)
        starts = tuple(sum(shards[:k]) for k in range(len(shards)))
        a = torch.randn(slots_n, len(shards) * rank, in_f, device=device, dtype=torch.bfloat16) * 0.02
        b = torch.randn(slots_n, total, rank, device=device, dtype=torch.bfloat16) * 0.02
        w = torch.randn(total, in_f, device=device, dtype=torch.bfloat16) * 0.02
        for tokens in (1, 16, 64, 256) if device == "cuda" else (1, 5):
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            # Grouped by adapter, as the scheduler orders a step's rows; the tile map is cut once (per step).
            slots = torch.randint(-1, slots_n, (tokens,), device=device).sort().values
            kernels = TritonLoRA(tokens, device)
            kernels.prepare_step(slots)
            y = x @ w.T
            want, got = y.clone(), y.clone()
            add_lora_reference(want, x, a, b, slots, starts)
            kernels(got, x, a, b, slots, starts)
            err = (got.float() - want.float()).abs().max().item()
            scale = want.float().abs().max().item()
            lora_ms = timed(lambda: kernels(y, x, a, b, slots, starts))  # noqa: B023
            base_ms = timed(lambda: x @ w.T)  # noqa: B023
            out[f"{name}@{tokens}"] = {"max_abs_err": err, "max_abs": scale, "ok": err <= 0.02 * scale + 1e-2,
                                       "lora_us": lora_ms * 1e3, "base_matmul_us": base_ms * 1e3}  # fmt: skip
    return out


def _engine(model_dir: Path, args: argparse.Namespace, **lora: Any) -> Any:
    from kvik import LLM

    return LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=2048, device=args.device,
               max_num_seqs=args.max_num_seqs, gpu_memory_utilization=0.85, **lora)  # fmt: skip


def _throughput(llm: Any, prompts: list[list[int]], loras: list[Any], out_len: int) -> dict[str, Any]:
    from kvik import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False, lora_request=loras[:4])
    llm.llm_engine.scheduler.reset_prefix_cache()
    torch_sync()
    slots = getattr(llm.llm_engine.runner, "lora", None)
    counters = ("num_loads", "num_prefetched", "step_load_s", "step_wait_s", "step_read_s")
    before = {k: getattr(slots, k, 0) for k in counters}
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    after = {k: getattr(slots, k, 0) for k in counters}
    return {"requests": len(prompts), "elapsed_s": elapsed, "output_tok_s": tokens / elapsed,
            "slot_loads": after["num_loads"] - before["num_loads"],
            "slot_prefetched": after["num_prefetched"] - before["num_prefetched"],
            "slot_load_s": after["step_load_s"] - before["step_load_s"],
            "slot_wait_s": after["step_wait_s"] - before["step_wait_s"],
            "slot_read_s": after["step_read_s"] - before["step_read_s"]}  # fmt: skip


def _batch1_profile(llm: Any, lora: Any) -> dict[str, Any]:
    """33 batch-1 tokens (a cached prompt: one prefill row, then 32 decode steps) under ``lora``, profiled."""
    from kvik import SamplingParams

    prompt = [[5 + i % 900 for i in range(128)]]
    params = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False, lora_request=lora)  # cache
    torch_sync()
    llm.start_profile()
    llm.generate(prompt, params, use_tqdm=False, lora_request=lora)
    summary = llm.stop_profile()[0]
    llm.llm_engine.scheduler.reset_prefix_cache()
    return profile_record(summary)


def _batch1_ms_per_token(llm: Any, lora: Any, out_len: int = 128) -> float:
    """Decode time per token of one request alone (prefill excluded: 1-token run subtracted)."""
    from kvik import SamplingParams

    prompt = [[5 + i % 900 for i in range(128)]]
    timings = []
    for n in (1, out_len):
        llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False, lora_request=lora)  # warm
        llm.llm_engine.scheduler.reset_prefix_cache()
        torch_sync()
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False, lora_request=lora)
        timings.append(time.perf_counter() - start)
        llm.llm_engine.scheduler.reset_prefix_cache()
    return (timings[1] - timings[0]) / (out_len - 1) * 1e3


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _offline_profile(llm: Any, prompts: list[list[int]], loras: list[Any], out_len: int) -> dict[str, Any]:
    """The first 96 prompts' offline run (each under its ``loras`` entry), profiled."""
    from kvik import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.llm_engine.scheduler.reset_prefix_cache()
    torch_sync()
    llm.start_profile()
    llm.generate(prompts[:96], params, use_tqdm=False, lora_request=loras[:96])
    summary = llm.stop_profile()[0]
    llm.llm_engine.scheduler.reset_prefix_cache()
    return profile_record(summary, top=40)


@part("base")
def bench_base(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    llm = _engine(model_dir, args)
    try:
        result = _throughput(llm, prompts, [None] * len(prompts), args.out_len)
        result["batch1_ms_per_token"] = _batch1_ms_per_token(llm, None)
        if args.profile:
            result["offline_profile"] = _offline_profile(llm, prompts, [None] * len(prompts), args.out_len)
        return result
    finally:
        llm.llm_engine.shutdown()


def _spread(paths: list[str], count: int, n: int) -> list[Any]:
    """Request i's adapter: uniform over the first ``count`` adapters (a fixed shuffle)."""
    import random

    from kvik.lora import LoRARequest

    rng = random.Random(7)
    return [LoRARequest(f"a{k}", k + 1, paths[k]) for k in (rng.randrange(count) for _ in range(n))]


@part("lora8")
def bench_lora8(model_dir: Path, prompts: list[list[int]], paths: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from kvik.lora import LoRARequest

    llm = _engine(model_dir, args, enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=len(paths))
    out: dict[str, Any] = {}
    try:
        out["graphs"] = bool(getattr(llm.llm_engine.runner, "lora_graphs", None))
        out["base_requests"] = _throughput(llm, prompts, [None] * len(prompts), args.out_len)
        for count in (1, 8, 64):
            out[f"adapters_{count}"] = _throughput(llm, prompts, _spread(paths, count, len(prompts)), args.out_len)
        one = LoRARequest("a0", 1, paths[0])
        out["batch1_ms_per_token_base"] = _batch1_ms_per_token(llm, None)
        out["batch1_ms_per_token_adapter"] = _batch1_ms_per_token(llm, one)
        if args.profile:
            out["batch1_profile_adapter"] = _batch1_profile(llm, one)
            out["batch1_profile_base"] = _batch1_profile(llm, None)
        return out
    finally:
        llm.llm_engine.shutdown()


@part("batch1")
def bench_batch1(model_dir: Path, paths: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode with one adapter vs none in the same engine, per one-row shrink split (``--b1-splits``;
    the CUDA graphs bake the kernel config in, so each split gets its own engine)."""
    from kvik.lora import LoRARequest

    out: dict[str, Any] = {}
    for split in (int(s) for s in args.b1_splits.split(",")):
        try:
            from kvik_cuda import lora_kernels

            lora_kernels.CONFIGS[1] = lora_kernels.LoRAKernelConfig(kernel="bgmv", split_k=split)
        except ImportError:
            pass  # no CUDA plugin (a CPU smoke run): the split does not apply
        llm = _engine(model_dir, args, enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=len(paths))
        try:
            one = LoRARequest("a0", 1, paths[0])
            runs = [(_batch1_ms_per_token(llm, None), _batch1_ms_per_token(llm, one)) for _ in range(3)]
            base, adapter = min(r[0] for r in runs), min(r[1] for r in runs)
            out[f"split_{split}"] = {"base_ms": base, "adapter_ms": adapter, "overhead": adapter / base - 1}
        finally:
            llm.llm_engine.shutdown()
    return out


@part("lora64")
def bench_lora64(model_dir: Path, prompts: list[list[int]], paths: list[str], args: argparse.Namespace) -> dict[str, Any]:
    llm = _engine(model_dir, args, enable_lora=True, max_loras=64, max_lora_rank=16, max_cpu_loras=len(paths))
    try:
        loras = _spread(paths, 64, len(prompts))
        result = {"adapters_64": _throughput(llm, prompts, loras, args.out_len)}
        if args.profile:
            result["offline_profile"] = _offline_profile(llm, prompts, loras, args.out_len)
        return result
    finally:
        llm.llm_engine.shutdown()


@part("load")
def bench_load(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from lora_load import measure

    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = 32 if args.shape == "llama8b" else 2
    return measure(layers, 16, 4, 2, device, root / "load")


def summarize() -> dict[str, Any]:
    parts = RESULTS["parts"]
    base = parts.get("base", {}).get("output_tok_s")
    summary: dict[str, Any] = {}
    if base:
        for name, key in (("lora8", "adapters_1"), ("lora8", "adapters_8"), ("lora8", "adapters_64"),
                          ("lora8", "base_requests"), ("lora64", "adapters_64")):  # fmt: skip
            got = parts.get(name, {}).get(key, {}).get("output_tok_s")
            if got:
                summary[f"{name}.{key}_vs_base"] = got / base
    lora8 = parts.get("lora8", {})
    if lora8.get("batch1_ms_per_token_adapter") and parts.get("base", {}).get("batch1_ms_per_token"):
        summary["batch1_overhead"] = lora8["batch1_ms_per_token_adapter"] / parts["base"]["batch1_ms_per_token"] - 1
    if "kernels" in parts:
        summary["kernels_ok"] = all(v["ok"] for v in parts["kernels"].values())
    for name in ("lora8", "lora64"):
        for key, run in parts.get(name, {}).items():
            if isinstance(run, dict) and run.get("slot_loads"):
                summary[f"{name}.{key}_slot_load_ms_per_load"] = run["slot_load_s"] / run["slot_loads"] * 1e3
    if "load" in parts:
        summary["load_step_fill_ms"] = parts["load"]["step_fill_ms"]
        summary["load_read_ms"] = parts["load"]["read_ms"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="requests per throughput run (the issue's: 1000)")
    parser.add_argument("--out-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--parts", default="kernels,base,lora8,lora64,load")
    parser.add_argument(
        "--profile", action="store_true", help="lora8: profile 33 batch-1 tokens with and without the adapter"
    )
    parser.add_argument("--no-overlap", action="store_true",
                        help="CUDA: run each shrink after the base GEMM on one stream (the A/B for the side stream)")
    parser.add_argument("--b1-splits", default="16,32,64", help="batch1: the one-row shrink splits to compare")
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES), help="tiny: a CPU smoke run")
    parser.add_argument("--device", default=None, help="platform (default: auto; cpu for a smoke run)")
    parser.add_argument("--root", default=os.environ.get("KVIK_BENCH_ROOT", "/tmp/kvik_lora_bench"))
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(args.parts.split(","))
    RESULTS["args"] = vars(args)
    if args.no_overlap:
        from kvik_cuda import lora_kernels

        lora_kernels.TritonLoRA.project = None  # type: ignore[assignment,method-assign]  # the runner installs None
    model_dir = write_model_dir(root, args.shape)
    prompts = workload(args.n, SHAPES[args.shape]["vocab_size"], lo=128, hi=1024)
    paths = write_adapters(root, model_dir, rank=16, count=64) if wanted & {"lora8", "lora64", "batch1"} else []
    if "kernels" in wanted:
        bench_kernels(args.shape)
    if "base" in wanted:
        bench_base(model_dir, prompts, args)
    if "lora8" in wanted:
        bench_lora8(model_dir, prompts, paths, args)
    if "batch1" in wanted:
        bench_batch1(model_dir, paths, args)
    if "lora64" in wanted:
        bench_lora64(model_dir, prompts, paths, args)
    if "load" in wanted:
        bench_load(root, args)
    RESULTS["summary"] = summarize()
    text = json.dumps(RESULTS, indent=2, default=str)
    print(text)
    out = Path(os.environ.get("OUT", str(root)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_throughput.json").write_text(text)
    return 0 if not RESULTS["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
