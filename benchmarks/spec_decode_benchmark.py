"""Speculative decoding on a GPU: decode ms/token at batch 1 / 4 / 16, with and without each method.

    python benchmarks/spec_decode_benchmark.py                 # H200: llama8b target, ~5 min
    python benchmarks/spec_decode_benchmark.py --device cpu --shape tiny --draft-shape tiny --new 16   # smoke

Dummy (seeded random) weights, so nothing is downloaded or written but config files.
Random weights do not copy text, so acceptance is made meaningful per method:

- ``replay``: a benchmark-only proposer that drafts the engine's own greedy continuation (recorded
  first with every draft rejected, so the verify steps' argmax is what gets replayed: in bfloat16 a
  random model's logits are so flat that a decode step's argmax would not be): 100% acceptance, the
  verify mechanics' upper bound, free drafts; ``--corrupt`` makes a fraction of the drafts wrong.
- ``ngram`` / ``suffix``: on a copy-heavy prompt built from the model's own output
  (prompt P, its greedy continuation C, then P again: the answer may repeat C);
  whatever acceptance that gives is reported next to the time.
- ``draft_model``: a ``--draft-shape`` draft (another seed: ~0% acceptance, the cost
  of drafting), and the target as its own draft (same dummy seed: identical weights,
  ~100% acceptance, the draft costing a full target step per token).
- ``eagle``: a random head in EAGLE's layout for the target shape (~0% acceptance):
  what a head's drafting steps cost.

decode ms/token = (t(new tokens) - t(1 token)) / (new - 1) for a batch of B copy
prompts, greedy, EOS ignored; every engine's tokens are checked against the
baseline's; ``cuda_graphs`` gives each engine's (and its draft runner's) graph count, verify shapes
and replays. One JSON summary is printed and written to $OUT/spec_decode_benchmark.json
(after every configuration, so a failure keeps what ran before it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import SHAPES, profile_record
from kvik.plugins.hookspecs import RegisterFn, hookimpl
from kvik.request import Request
from kvik.spec_decode.proposer import Proposer

SHAPES.setdefault(
    "llama1b",  # Llama-3.2-1B shape: the draft
    dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
         rms_norm_eps=1e-5, tie_word_embeddings=True),
)  # fmt: skip

KVIK_PLUGIN_API = ">=2.2,<3"
CONTINUATIONS: dict[tuple[int, ...], list[int]] = {}  # prompt -> the baseline's greedy output


CORRUPT = [0.0]  # the fraction of replayed draft tokens made wrong (set between measurements)


class ReplayProposer(Proposer):
    """Drafts the baseline's continuation, a fixed pseudo-random fraction ``CORRUPT[0]`` of tokens made wrong.

    Which positions are wrong depends only on (prompt length, position), so every run of a
    configuration drafts the same tokens and the acceptance rate is set by the fraction alone.
    """

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        import random

        out = []
        for r, k in zip(requests, num_tokens, strict=True):
            truth = CONTINUATIONS.get(tuple(r.prompt_token_ids), [])
            first = r.num_output_tokens
            draft = list(truth[first : first + k])
            for j in range(len(draft)):
                if random.Random((first + j) * 1_000_003 + len(r.prompt_token_ids)).random() < CORRUPT[0]:
                    draft[j] = draft[j] + 1 if draft[j] > 3 else draft[j] + 7  # a wrong, valid token id
            out.append(draft)
        return out


@hookimpl
def kvik_register_spec_proposers(register: RegisterFn) -> None:
    register("replay", "__main__:ReplayProposer")


def config_dir(root: Path, shape: str) -> Path:
    from gpu_common import dummy_model_dir

    return dummy_model_dir(root, shape)


def eagle_head_dir(root: Path, shape: str) -> Path:
    """A random EAGLE head (yuhuili/EAGLE-LLaMA3-Instruct-8B's layout) for ``shape``: what drafting costs."""
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    path = root / f"{shape}-eagle-head"
    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    h, heads, kv, inter = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
    hd = h // heads
    gen = torch.Generator().manual_seed(0)

    def w(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {
        "fc.weight": w(h, 2 * h),
        "fc.bias": w(h),
        "layers.0.self_attn.q_proj.weight": w(heads * hd, h),
        "layers.0.self_attn.k_proj.weight": w(kv * hd, h),
        "layers.0.self_attn.v_proj.weight": w(kv * hd, h),
        "layers.0.self_attn.o_proj.weight": w(h, heads * hd),
        "layers.0.mlp.gate_proj.weight": w(inter, h),
        "layers.0.mlp.up_proj.weight": w(inter, h),
        "layers.0.mlp.down_proj.weight": w(h, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path / "model.safetensors"))
    config = {k: v for k, v in s.items() if k != "tie_word_embeddings"}
    (path / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]})
    )
    return path


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_llm(model: Path, args: argparse.Namespace, spec: dict[str, Any] | None) -> Any:
    from kvik import LLM

    return LLM(
        model=str(model), device=args.device, dtype=args.dtype or ("bfloat16" if args.device != "cpu" else "float32"),
        load_format="dummy", max_model_len=args.max_len, max_num_seqs=max(args.batches),
        gpu_memory_utilization=0.8, speculative_config=spec,
        # Off: ms/token subtracts a 1-token run, whose prefill would otherwise be cached for the long run
        # (at batch 16 that made run f's numbers negative).
        enable_prefix_caching=False,
    )  # fmt: skip


def free(llm: Any) -> None:
    import torch

    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(llm: Any, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]], Any]:
    from kvik import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
    sync()
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    return time.perf_counter() - t, [o.outputs[0].token_ids for o in out], out


def graph_info(llm: Any) -> dict[str, Any]:
    """The CUDA runner's graphs: how many, the verify shapes, and how often they replayed (target and draft)."""
    info: dict[str, Any] = {}
    runners = {"target": llm.llm_engine.runner}
    draft = getattr(getattr(runners["target"], "drafter", None), "draft", None)
    if draft is not None:
        runners["draft"] = draft
    for name, runner in runners.items():
        if hasattr(runner, "replays"):
            info[name] = {"graphs": len(runner.graphs), "replays": runner.replays,
                          "verify_shapes": [list(g) for g in runner.verify_shapes]}  # fmt: skip
    return info


def measure(
    llm: Any, prompts: list[list[int]], args: argparse.Namespace, want: dict | None, replay: bool = False
) -> dict[str, Any]:
    """Per batch size: decode ms/token, acceptance, and whether the tokens match the baseline's.

    ``replay``: first record what this engine itself generates with every draft rejected, and replay
    that. In bfloat16 a random model's near-flat logits let a verify step's argmax differ from a
    decode step's, so the baseline's tokens would not be accepted; the engine's own verify-step tokens are.
    """
    results: dict[str, Any] = {}
    timed(llm, prompts[:1], 4)  # warm-up (Triton compiles, allocator)
    for b in args.batches:
        batch = prompts[:b]
        if replay:
            fraction, CORRUPT[0] = CORRUPT[0], 1.0
            _, truth, _ = timed(llm, batch, args.new)
            CORRUPT[0] = fraction
            for p, t in zip(batch, truth, strict=True):
                CONTINUATIONS[tuple(p)] = t
        t1, _, _ = timed(llm, batch, 1)
        best = float("inf")
        for _ in range(args.repeats):
            tn, tokens, outs = timed(llm, batch, args.new)
            best = min(best, tn)
        drafted = sum(o.metrics.num_draft_tokens for o in outs)
        accepted = sum(o.metrics.num_accepted_tokens for o in outs)
        row: dict[str, Any] = {
            "ms_per_token": round((best - t1) / (args.new - 1) * 1e3, 3),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "drafted": drafted,
        }
        if want is not None:
            row["same_tokens"] = tokens == want[str(b)]
        else:
            for p, t in zip(batch, tokens, strict=True):
                CONTINUATIONS[tuple(p)] = t
        results[str(b)] = row
        results.setdefault("_tokens", {})[str(b)] = tokens
    if args.profile:
        results["profile"] = profile_steps(llm, prompts[:1], args.profile_new)
    return results


def profile_steps(llm: Any, batch: list[list[int]], new: int = 17) -> dict[str, Any]:
    """Where a batch-1 run of ``new`` tokens goes: kernels (torch.profiler) and host functions (cProfile)."""
    import cProfile
    import io
    import pstats

    llm.start_profile()
    wall, _, _ = timed(llm, batch, new)
    summary = llm.stop_profile()[0]
    host = cProfile.Profile()
    host.enable()
    timed(llm, batch, new)
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(25)
    # The generate call's own wall time (the summary's runs from start_profile to stop_profile).
    return {**profile_record(summary, top=15), "wall_ms": round(wall * 1e3, 1),
            "host_top": text.getvalue().splitlines()[-32:]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--draft-shape", default="llama1b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--root", default="/tmp/kvik_spec_bench")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--replay-ks", type=int, nargs="+", default=[2, 4, 8], help="k for the replay proposer")
    ap.add_argument("--corrupt", type=float, nargs="+", default=[0.0, 0.2, 0.5, 1.0],
                    help="fractions of replayed draft tokens made wrong (acceptance ~100/80/50/0%%)")
    ap.add_argument("--offline-n", type=int, default=300, help="requests of the offline spec-on/off part (0: skip)")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--dtype", default=None,
                    help="model dtype (default bf16 on a GPU). float32 keeps random-weight logits' argmax stable across "
                         "step shapes, so replayed drafts are accepted as intended (bf16's near-ties flip it)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="also profile a batch-1 run of each configuration")
    ap.add_argument("--profile-new", type=int, default=17,
                    help="tokens of the profiled run (its one prefill weighs less in a longer run)")
    args = ap.parse_args()

    from kvik.plugins.manager import get_plugin_manager

    get_plugin_manager().register(sys.modules[__name__], "spec-bench-replay")
    root = Path(args.root)
    target = config_dir(root, args.shape)
    draft = config_dir(root, args.draft_shape)
    out_path = Path(os.environ.get("OUT", "/tmp")) / "spec_decode_benchmark.json"
    summary: dict[str, Any] = {"shape": args.shape, "draft_shape": args.draft_shape, "k": args.k, "new": args.new,
                               "device": args.device, "configs": {}}  # fmt: skip
    k = args.k

    # Copy-heavy prompts: P (256 random tokens), the model's greedy continuation C, then P again.
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    bases = [rng.integers(3, vocab, size=256).tolist() for _ in range(max(args.batches))]
    configs: list[tuple[str, Path, dict[str, Any] | None]] = [
        ("baseline", target, None),
        *[(f"replay_k{rk}", target, {"method": "replay", "num_speculative_tokens": rk}) for rk in args.replay_ks],
        ("ngram", target, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 5}),
        ("suffix", target, {"method": "suffix", "num_speculative_tokens": k}),
        ("draft_model_small", target, {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}),
        ("draft_model_self", target, {"method": "draft_model", "model": str(target), "num_speculative_tokens": k}),
        ("eagle_random_head", target, {"method": "eagle", "model": "<eagle head>", "num_speculative_tokens": k}),
    ]
    prompts: list[list[int]] = []
    want: dict | None = None
    for name, model, spec in configs:
        if args.only and name not in args.only and name != "baseline":
            continue
        start = time.perf_counter()
        try:
            if spec is not None and spec.get("model") == "<eagle head>":
                spec = {**spec, "model": str(eagle_head_dir(root, args.shape))}
            llm = make_llm(model, args, spec)
            try:
                if name == "baseline":
                    _, conts, _ = timed(llm, bases, args.new)
                    prompts = [p + c + p for p, c in zip(bases, conts, strict=True)]
                if name.startswith("replay_k"):
                    result = {}
                    for fraction in args.corrupt:  # one engine, several acceptance levels
                        CORRUPT[0] = fraction
                        part = measure(llm, prompts, args, want, replay=True)
                        part.pop("_tokens")
                        result[f"corrupt_{fraction}"] = part
                    CORRUPT[0] = 0.0
                    tokens = None
                else:
                    result = measure(llm, prompts, args, want)
                    tokens = result.pop("_tokens")
                if name == "baseline":
                    want = tokens
                result["cuda_graphs"] = graph_info(llm)
            finally:
                free(llm)
            result["seconds"] = round(time.perf_counter() - start, 1)
        except Exception as exc:  # keep the other configurations' results
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        summary["configs"][name] = result
        base = summary["configs"].get("baseline", {})
        for row in [result, *[v for v in result.values() if isinstance(v, dict)]]:
            for b in map(str, args.batches):
                if isinstance(row.get(b), dict) and isinstance(base.get(b), dict):
                    row[b]["speedup"] = round(base[b]["ms_per_token"] / row[b]["ms_per_token"], 3)
        print(f"RESULT {name}: {json.dumps(result)}", flush=True)
        out_path.write_text(json.dumps(summary, indent=1))
    if args.offline_n:
        summary["offline"] = offline(target, args)
        out_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def offline(target: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Offline throughput at up to 256 running requests, spec off vs n-gram spec with ``disable_by_batch_size``:
    under load the method must turn itself off and cost (almost) nothing."""
    from gpu_common import workload
    from kvik import LLM, SamplingParams

    results: dict[str, Any] = {"n": args.offline_n, "out_len": 256}
    spec_on = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 5, "disable_by_batch_size": 32}
    for name, spec in (("spec_off", None), ("ngram_disable_by_batch_32", spec_on)):
        try:
            llm = LLM(model=str(target), device=args.device, dtype="bfloat16", load_format="dummy",
                      max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
                      gpu_memory_utilization=0.8, speculative_config=spec)  # fmt: skip
            try:
                prompts = [{"prompt_token_ids": p} for p in workload(args.offline_n, SHAPES[args.shape]["vocab_size"])]
                params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True, detokenize=False)
                llm.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                         detokenize=False), use_tqdm=False)  # fmt: skip
                sync()
                t = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                sync()
                wall = time.perf_counter() - t
                results[name] = {"wall_s": round(wall, 2), "out_tok_s": round(args.offline_n * 256 / wall, 1)}
            finally:
                free(llm)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(f"RESULT offline {name}: {json.dumps(results[name])}", flush=True)
    off, on = results.get("spec_off", {}), results.get("ngram_disable_by_batch_32", {})
    if "out_tok_s" in off and "out_tok_s" in on:
        results["ratio_on_off"] = round(on["out_tok_s"] / off["out_tok_s"], 3)
    return results


if __name__ == "__main__":
    main()
