"""Single-stream speculative decoding on CPU with real weights (the bundled SmolLM2-135M-Instruct).

Two engines in one process, the same model: one without speculation and one per
method (``--methods``). Each workload prompt runs once per engine per round, the
engines interleaved so machine noise hits them alike; greedy decoding, so in float32 every
engine must produce the same tokens (checked). In bfloat16 (the packed GGUF path, kvik's CPU
default) a verify step's rows may round differently from a decode step's and flip a near-tie, so
there the share of identical answers is reported instead. Reports decode tok/s, the speed-up
and the acceptance rate per draft position.

    python benchmarks/spec_decode_cpu.py --max-tokens 96 --rounds 2 --num-threads 1
    python benchmarks/spec_decode_cpu.py --dtype bfloat16 --methods ngram,suffix
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvik import LLM, SamplingParams

_TEXT = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()[:1400]

WORKLOADS = {
    # The answer copies most of the prompt: the case prompt lookup is for.
    "copy": [
        "Repeat the following text exactly, word for word, fixing nothing:\n\n" + _TEXT[:700],
        "Rewrite the following text, replacing every 'kvik' with 'the engine' and keeping everything else:\n\n"
        + _TEXT[700:1400],
    ],
    # Open-ended chat: little to copy.
    "chat": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "What are three good habits for staying healthy? Explain each briefly.",
    ],
}


def run(llm: LLM, prompt: str, max_tokens: int) -> tuple[list[int], float, object]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=False)
    start = time.perf_counter()
    out = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)[0]
    return out.outputs[0].token_ids, time.perf_counter() - start, out.metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--methods", default="ngram")
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="float32 (dequantized weights) or bfloat16 (packed)")
    args = ap.parse_args()
    common = dict(num_threads=args.num_threads, max_model_len=2048, seed=0, dtype=args.dtype)
    engines = {"off": LLM(**common)}
    for method in args.methods.split(","):
        spec = {"method": method, "num_speculative_tokens": args.k}
        engines[method] = LLM(speculative_config=spec, **common)
    for llm in engines.values():  # warm-up
        run(llm, "Hello", 8)
    results: dict = {}
    for workload, prompts in WORKLOADS.items():
        for name in engines:
            results[(workload, name)] = {"tokens": 0, "seconds": 0.0, "drafted": [], "accepted": [], "same": 0, "runs": 0}
        for _ in range(args.rounds):
            for prompt in prompts:
                reference = None
                for name, llm in engines.items():
                    tokens, seconds, metrics = run(llm, prompt, args.max_tokens)
                    if reference is None:
                        reference = tokens
                    if args.dtype == "float32":
                        assert tokens == reference, f"{name} changed the greedy output of {workload}"
                    r = results[(workload, name)]
                    r["same"] += tokens == reference
                    r["runs"] += 1
                    r["tokens"] += len(tokens)
                    r["seconds"] += seconds
                    for key, counts in (("drafted", metrics.drafted_per_position),
                                        ("accepted", metrics.accepted_per_position)):  # fmt: skip
                        r[key].extend([0] * (len(counts) - len(r[key])))
                        for i, c in enumerate(counts):
                            r[key][i] += c
    print(f"{'workload':<8} {'method':<7} {'tok/s':>7} {'speed-up':>9} {'accept':>7}  per position")
    summary = []
    for (workload, name), r in results.items():
        tps = r["tokens"] / r["seconds"]
        base = results[(workload, "off")]
        speedup = tps / (base["tokens"] / base["seconds"])
        drafted, accepted = sum(r["drafted"]), sum(r["accepted"])
        rate = accepted / drafted if drafted else 0.0
        per_pos = [round(a / d, 2) if d else 0.0 for a, d in zip(r["accepted"], r["drafted"], strict=True)]
        print(f"{workload:<8} {name:<7} {tps:7.1f} {speedup:8.2f}x {rate:7.2f}  {per_pos}")
        summary.append(dict(workload=workload, method=name, tok_s=tps, speedup=speedup, acceptance=rate,
                            per_position=per_pos, identical_answers=f"{r['same']}/{r['runs']}"))  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
