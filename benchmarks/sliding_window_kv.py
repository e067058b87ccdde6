"""KV blocks held by a model whose layers all slide, with the blocks behind the window released or kept.

    python benchmarks/sliding_window_kv.py                      # ~1 minute on 2 CPU cores
    python benchmarks/sliding_window_kv.py --window 256 --num-kv-blocks 160 --output-len 512

A random Mistral-shaped model (every layer slides with ``--window``) generates long outputs for a batch of
requests on a KV pool too small to hold them all whole. Same engine, same run, release on (the default)
and off (``Scheduler.sliding_window`` cleared): peak blocks held per request, preemptions, steps and output
tokens/s, and whether the tokens agree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _run(model: Path, args: argparse.Namespace, release: bool) -> dict[str, object]:
    import torch
    from kvik import LLM, SamplingParams
    from kvik.testing.reference import random_prompts

    torch.set_num_threads(args.num_threads)
    llm = LLM(str(model), device="cpu", dtype="float32", block_size=args.block_size,
              num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.num_requests, max_model_len=args.max_model_len)  # fmt: skip
    engine = llm.llm_engine
    if not release:
        engine.scheduler.sliding_window = None
    prompts = random_prompts(args.num_requests, seed=1, low=args.input_len // 2, high=args.input_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    kv = engine.scheduler.kv_cache
    peak_used, steps, tokens = 0, 0, {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        steps += 1
        peak_used = max(peak_used, kv.pool.num_usable_blocks - kv.num_free_blocks)
    wall = time.perf_counter() - start
    return {
        "release": release,
        "window": engine.model_config.sliding_window,
        "peak_blocks_held": peak_used,
        "pool_blocks": kv.pool.num_usable_blocks,
        "preemptions": engine.scheduler.get_stats().num_preemptions,
        "steps": steps,
        "out_tok_s": round(args.num_requests * args.output_len / wall, 1),
        "tokens": [tokens[f"r{i}"] for i in range(args.num_requests)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=96)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=384)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=1024, help="the pool must hold one such sequence whole")
    args = ap.parse_args()
    from kvik.testing.tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "mistral", arch="mistral", sliding_window=args.window,
                                max_position_embeddings=4096)  # fmt: skip
        rows = [_run(model, args, release) for release in (True, False, True, False)]
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    for r in rows:
        r.pop("tokens")
        print(json.dumps(r))
    print(json.dumps({"tokens_identical": same, **vars(args)}))


if __name__ == "__main__":
    main()
