"""Single-stream decode speed on the CPU at a long context, bundled SmolLM2 Q4_1.

    python benchmarks/cpu_long_context.py --context 2048 --rounds 2

Each round: a fresh random prompt of ``--context`` token ids with 1 new token, then another with 129; decode
tok/s = 128 / (the difference). Prefix caching is off so that every request sees a fresh prompt (and, on a
pool no other request fragments, consecutive blocks: docs/benchmarks.md, "A single stream's K/V read in
place").
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from kvik import LLM, SamplingParams
    from kvik.models.default import default_model

    llm = LLM(model=default_model(), max_num_seqs=1, num_threads=args.threads, max_model_len=2 * args.context,
              enable_prefix_caching=False)  # fmt: skip
    rng = random.Random(0)

    def run(new: int) -> float:
        prompt = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(args.context)]}
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    rates = [round(128 / (run(129) - run(1)), 1) for _ in range(args.rounds)]
    print(f"context {args.context}, {args.threads} threads: decode tok/s {rates}")


if __name__ == "__main__":
    main()
