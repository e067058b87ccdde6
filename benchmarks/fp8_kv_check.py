"""FP8 KV cache on one GPU (H100/H200): ``kv_cache_dtype="fp8"`` against ``"auto"`` (bf16), same run.

From the repository root on the GPU machine (no network; about 3 minutes on an H200)::

    pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton \\
        && python benchmarks/fp8_kv_check.py

(Without the ``pip install`` the script still finds the checkout's packages through ``sys.path``, as
long as the plugins' entry points are registered: they are once installed.) The model is the
Llama-3.1-8B shape with dummy weights (``load_format="dummy"``: only config.json and a word
tokenizer are written, under ``--root``). First, ``kernels`` (own process): the Triton backend on a float8 cache at the 8B
attention shape (32 query / 8 KV heads of 128, bf16) through ``check_fp8_kv_cache`` (written
entries equal the reference quantization; attention equals torch_ref over the dequantized cache),
and one decode step's attention time (256 requests x 1024 context) on a bf16 vs an fp8 cache.
Then for each variant, in its own process (a crash or hang costs only that variant):

1. ``capacity``: the memory plan at the same ``--gpu-memory-utilization`` (default 0.2, low enough
   that the workloads below reach the cache's edge quickly): KV blocks, tokens, bytes per block;
2. ``agreement``: greedy tokens (and top-5 logprobs) for 48 prompts (U[128, 512] tokens, 32 new);
   the parent compares fp8 with auto the ``check_logprobs_close`` way (identical, or at the first
   divergence each side's token in the other's top 5, with the logprob gap there);
3. ``throughput``: offline, ``--n`` requests (default 300) of the usual workload (prompts U[128, 1024],
   ``--out-len`` 256 new tokens, greedy, EOS ignored), output tokens/s and preemptions;
4. ``memory_edge``: ``--max-num-seqs`` requests (admitted together) whose prompts plus outputs need
   1.3x the cache's tokens, so decoding outgrows the cache and the scheduler must preempt; every
   request must finish with all its tokens.

Each part prints a ``RESULT fp8_kv <variant> <part> {...}`` line when it finishes; the summary
(with the fp8/auto comparison) is rewritten to $OUT/fp8_kv_check.json after every process and
printed at the end; each variant's raw record (token ids, logprobs) is $OUT/fp8_kv_<variant>.json.
Everything runs within ``--budget-s`` (190 s, so it fits benchmarks/gpu_pending.sh's 200 s
``fp8_kv`` stage); a process cut short keeps the parts it finished. Cold Triton compiles of the 8B
engine can take ~80 s each: if a variant runs out of time, rerun with the Triton cache warm, or with
``--budget-s 400`` under a longer timeout. ``--shape tiny --device cpu --kv-cache-memory 1048576 --max-model-len 1100 --n 20 --out-len 16
--agree-n 8 --agree-len 8 --max-num-seqs 16`` smoke-tests the script on a CPU (about a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
for pkg in ("core", "platforms/cuda", "platforms/cpu", "attention_backends/triton"):
    sys.path.insert(0, str(ROOT / pkg))  # the checkout's packages win over installed copies

VARIANTS = ("auto", "fp8")
TOP = 5


def model_dir(root: Path, shape: str) -> Path:
    from gpu_common import dummy_model_dir

    return dummy_model_dir(root, shape)


# -- one variant (a child process) ------------------------------------------------------------------------
def variant(name: str, args: argparse.Namespace, out: dict[str, Any], save: Any) -> None:
    import kvik
    import torch
    from gpu_common import SHAPES, sync, workload
    from kvik import SamplingParams

    vocab = SHAPES[args.shape]["vocab_size"]
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(device=args.device, dtype="bfloat16", load_format="dummy", max_model_len=args.max_model_len,
                                  max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    llm = kvik.LLM(model=str(model_dir(Path(args.root), args.shape)), kv_cache_dtype=name, **kwargs)
    engine = llm.llm_engine
    plan = engine.memory_plan
    caches = engine.runner.kv_caches if engine.runner is not None else []
    out["capacity"] = {
        "init_s": round(time.perf_counter() - t0, 1),
        "kv_tokens": plan.kv_tokens,
        "num_blocks": plan.num_blocks,
        "block_bytes": plan.block_bytes,
        "kv_gib": round(plan.kv_bytes / 2**30, 2),
        "cache_tensor_dtype": str(caches[0].dtype) if caches else None,
        "metrics_kv_cache_dtype": engine.get_stats().kv_cache_dtype,
        "attention_backend": engine.runner.attn_backend.name if engine.runner is not None else None,
        "plan": plan.summary(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
    }
    save()

    def generate(prompts: list[list[int]], params: SamplingParams) -> tuple[list[Any], float, int]:
        before = engine.get_stats().num_preemptions
        sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        return outs, time.perf_counter() - t, engine.get_stats().num_preemptions - before

    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(8, vocab, seed=5), warm, use_tqdm=False)  # compile the kernels

    params = SamplingParams(max_tokens=args.agree_len, temperature=0.0, ignore_eos=True, detokenize=False, logprobs=TOP)
    outs, wall, _ = generate(workload(args.agree_n, vocab, 128, 512, seed=77), params)
    out["agreement"] = {
        "wall_s": round(wall, 2),
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": [[{str(t): round(lp.logprob, 5) for t, lp in s.items()} for s in o.outputs[0].logprobs] for o in outs],
    }
    save()

    prompts = workload(args.n, vocab)
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    outs, wall, preempted = generate(prompts, params)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    out["throughput"] = {
        "n": args.n, "out_len": args.out_len, "wall_s": round(wall, 2), "out_tok_s": round(out_tokens / wall, 1),
        "total_tok_s": round((out_tokens + sum(map(len, prompts))) / wall, 1), "preemptions": preempted,
        "complete": out_tokens == args.n * args.out_len,
    }  # fmt: skip
    save()

    # Preemption needs running requests whose growth outgrows the cache: max_num_seqs requests (all admitted
    # at once) whose prompt + output tokens add up to edge_factor x the cache (capped at max_model_len).
    per_request = min(args.max_model_len, math.ceil(args.edge_factor * plan.kv_tokens / args.max_num_seqs))
    new_tokens = per_request // 4  # prompts fill most of the cache at admission, decoding outgrows it
    prompt_len = per_request - new_tokens
    n = args.max_num_seqs
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    outs, wall, preempted = generate(workload(n, vocab, prompt_len, prompt_len, seed=31), params)
    out["memory_edge"] = {
        "requests": n, "prompt_len": prompt_len, "new_tokens": new_tokens, "tokens_needed": n * per_request,
        "kv_tokens": plan.kv_tokens, "wall_s": round(wall, 2), "preemptions": preempted,
        "complete": all(len(o.outputs[0].token_ids) == new_tokens for o in outs),
    }  # fmt: skip
    save()


def kernels(out: dict[str, Any], save: Any) -> None:
    import torch
    import triton.testing
    from kvik.testing.conformance.attention import build_metadata
    from kvik.testing.conformance.fp8_kv import check_fp8_kv_cache
    from kvik_triton_attention.backend import TritonAttentionBackend

    for window in (None, 64):
        try:
            check_fp8_kv_cache(TritonAttentionBackend, "cuda", torch.bfloat16, head_size=128, num_heads=32,
                               num_kv_heads=8, window=window)  # fmt: skip
            out[f"conformance_window_{window}"] = "ok"
        except AssertionError as exc:
            out[f"conformance_window_{window}"] = str(exc)[:600]
        save()
    reqs, ctx, bs = 256, 1024, 16
    per = ctx // bs
    meta = build_metadata([1] * reqs, [ctx] * reqs, [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(reqs)],
                          bs, "cuda")  # fmt: skip
    query = torch.randn(reqs, 32, 128, device="cuda", dtype=torch.bfloat16)
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        cache = torch.randn(2, reqs * per + 1, bs, 8, 128, device="cuda").to(dtype)
        backend = TritonAttentionBackend(32, 128, 8, 128**-0.5)
        TritonAttentionBackend.prepare(meta)
        o = torch.empty_like(query)
        ms = triton.testing.do_bench(lambda b=backend, c=cache, o=o: b.attend(query, c, meta, o), warmup=10, rep=50,
                                     return_mode="median")  # fmt: skip
        out[f"decode_attention_{name}_us"] = round(ms * 1e3, 1)
        del cache
        save()


def _child(name: str, args: argparse.Namespace, out_dir: Path) -> None:
    out: dict[str, Any] = {"variant": name}
    path = out_dir / f"fp8_kv_{name}.json"

    printed: set[str] = set()

    def save() -> None:
        path.write_text(json.dumps(out, default=str))
        for part, value in out.items():  # one RESULT line per finished part, as the other GPU scripts print
            if part not in printed and isinstance(value, dict | str) and part != "variant":
                shown = {k: v for k, v in value.items() if k not in ("tokens", "logprobs")} if isinstance(value, dict) else value
                print(f"RESULT fp8_kv {name} {part} {json.dumps(shown, default=str)[:1000]}", flush=True)
                printed.add(part)

    try:
        if name == "kernels":
            kernels(out, save)
        else:
            variant(name, args, out, save)
    except Exception as exc:  # what ran is kept; the error says where it stopped
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-3000:]
    save()


def _run_child(name: str, args: argparse.Namespace, out_dir: Path, limit: float) -> dict[str, Any]:
    path = out_dir / f"fp8_kv_{name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
    tail = ""
    stdout = ""
    try:
        proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
        stdout = proc.stdout
        tail = (proc.stdout + proc.stderr)[-1500:]
        if proc.returncode:
            tail = f"exit {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        tail = f"timed out after {limit:.0f} s: {str(exc.stderr or '')[-800:]}"
    for line in stdout.splitlines():  # the child's per-part RESULT lines, into this process's log
        if line.startswith("RESULT"):
            print(line, flush=True)
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"variant": name}
    if tail and ("error" in result or (name != "kernels" and "memory_edge" not in result)):
        result["process_tail"] = tail
    return result


# -- the comparison ---------------------------------------------------------------------------------------
def agreement(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """fp8 vs auto greedy sequences, vLLM's check_logprobs_close style."""
    identical = first_same = close = 0
    prefix: list[int] = []
    gaps: list[float] = []
    far: list[dict[str, Any]] = []
    pairs = zip(got["tokens"], got["logprobs"], ref["tokens"], ref["logprobs"], strict=True)
    for i, (tokens, lps, ref_tokens, ref_lps) in enumerate(pairs):
        first_same += tokens[:1] == ref_tokens[:1]
        pos = next((p for p, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), None)
        if pos is None:
            identical += 1
            prefix.append(len(tokens))
            continue
        prefix.append(pos)
        a, b = str(tokens[pos]), str(ref_tokens[pos])
        in_top = a in ref_lps[pos] and b in lps[pos]
        gap = abs(lps[pos][a] - ref_lps[pos][a]) if a in ref_lps[pos] else None
        if in_top:
            close += 1
            gaps.append(gap or 0.0)
        else:
            far.append({"prompt": i, "step": pos, "fp8": tokens[pos], "auto": ref_tokens[pos]})
    n = len(prefix)
    return {
        "prompts": n, "identical": identical, "first_token_same": first_same,
        "diverged_within_top5": close, "diverged_outside_top5": far[:10],
        "mean_matching_prefix": round(sum(prefix) / max(1, n), 2),
        "max_logprob_gap_at_divergence": round(max(gaps), 4) if gaps else None,
        "check_logprobs_close_ok": not far,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="llama8b", help="a gpu_common.SHAPES name ('tiny' to smoke-test on CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--kv-cache-memory", type=int, default=0, help="bytes; overrides the utilisation (smoke tests)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--agree-n", type=int, default=48)
    ap.add_argument("--agree-len", type=int, default=32)
    ap.add_argument("--edge-factor", type=float, default=1.3, help="memory_edge needs this many times the cache")
    ap.add_argument("--budget-s", type=float, default=190,
                    help="wall-clock limit for all parts (190: fits benchmarks/gpu_pending.sh's 200 s stage)")  # fmt: skip
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        _child(args.child, args, out_dir)
        return
    start = time.perf_counter()
    summary: dict[str, Any] = {"args": vars(args)}
    model_dir(Path(args.root), args.shape)  # written once, before the children race for it
    if args.device == "cuda":
        summary["kernels"] = _run_child("kernels", args, out_dir, min(45.0, args.budget_s / 4))
        _write_summary(summary, start, out_dir)
    for i, name in enumerate(VARIANTS):
        left = args.budget_s - (time.perf_counter() - start)
        summary[name] = _run_child(name, args, out_dir, max(30.0, left / (len(VARIANTS) - i)))
        _write_summary(summary, start, out_dir)  # a run killed later still leaves what finished
    print("RESULT fp8_kv_check " + json.dumps(summary.get("compare", {}), default=str), flush=True)
    print((out_dir / "fp8_kv_check.json").read_text())


def _write_summary(summary: dict[str, Any], start: float, out_dir: Path) -> None:
    """$OUT/fp8_kv_check.json from the variants run so far, with the fp8-vs-auto comparison when both ran."""
    auto, fp8 = summary.get("auto", {}), summary.get("fp8", {})
    compare: dict[str, Any] = {}
    try:
        if "capacity" in auto and "capacity" in fp8:
            compare["kv_tokens_ratio"] = round(fp8["capacity"]["kv_tokens"] / auto["capacity"]["kv_tokens"], 3)
            compare["block_bytes_ratio"] = round(fp8["capacity"]["block_bytes"] / auto["capacity"]["block_bytes"], 3)
        if "tokens" in auto.get("agreement", {}) and "tokens" in fp8.get("agreement", {}):
            compare["agreement"] = agreement(fp8["agreement"], auto["agreement"])
        if "throughput" in auto and "throughput" in fp8:
            compare["throughput_ratio"] = round(fp8["throughput"]["out_tok_s"] / auto["throughput"]["out_tok_s"], 3)
        if auto and fp8:
            compare["memory_edge_ok"] = all(v.get("memory_edge", {}).get("complete") is True for v in (auto, fp8))
    except Exception as exc:
        compare["error"] = f"{type(exc).__name__}: {exc}"
    if compare:
        summary["compare"] = compare
    summary["total_s"] = round(time.perf_counter() - start, 1)
    shown = {k: v for k, v in summary.items()}
    for key in ("auto", "fp8"):  # the per-token lists stay in fp8_kv_<variant>.json; the summary stays readable
        if isinstance(shown.get(key), dict) and "agreement" in shown[key]:
            agreement_part = {k: v for k, v in shown[key]["agreement"].items() if k not in ("tokens", "logprobs")}
            shown[key] = {**shown[key], "agreement": agreement_part}
    (out_dir / "fp8_kv_check.json").write_text(json.dumps(shown, indent=1, default=str))
    summary.update({k: v for k, v in shown.items() if k not in ("auto", "fp8")})

if __name__ == "__main__":
    main()
