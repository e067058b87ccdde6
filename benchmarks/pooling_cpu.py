"""Embedding throughput on this CPU: kvik's pooling runner vs sentence-transformers' ``encode``, same process.

    python benchmarks/pooling_cpu.py --num-texts 128 --num-threads 2

A random-weight Qwen3 embedder (last-token pooling, normalised; sentence-transformers
files written like a real checkpoint), texts of mixed lengths. sentence-transformers
runs at each ``--st-batch-sizes`` and its best is reported; kvik gets all texts at
once (its scheduler packs them without padding). Vectors are checked to agree.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def texts_of(n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "the",
        "dog",
        "told",
        "a",
        "long",
        "story",
        "about",
        "code",
        "and",
        "tea",
        "and",
        "hello",
        "world",
    ]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-texts", type=int, default=128)
    p.add_argument("--words", default="32:192", help="min:max words per text")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--st-batch-sizes", default="8,32,128")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch
    from kvik import LLM
    from kvik.testing.tiny_pooling import make_tiny_embedder
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.num_threads)
    lo, hi = (int(x) for x in args.words.split(":"))
    texts = texts_of(args.num_texts, lo, hi, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_embedder(
            Path(tmp) / "embedder", "qwen3", "last", hidden_size=args.hidden, num_hidden_layers=args.layers,
            intermediate_size=3 * args.hidden, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            max_position_embeddings=1024, max_seq_length=1024,
        )  # fmt: skip
        st = SentenceTransformer(str(path), device="cpu")
        llm = LLM(str(path), dtype="float32", device="cpu", num_threads=args.num_threads, max_model_len=1024,
                  max_num_seqs=args.num_texts, max_num_batched_tokens=8192)  # fmt: skip
        tokens = sum(len(llm.get_tokenizer().encode(t)) for t in texts)
        results: dict[str, float] = {}
        ref = None
        for bs in (int(b) for b in args.st_batch_sizes.split(",")):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                ref = st.encode(texts, batch_size=bs)
                best = min(best, time.perf_counter() - start)
            results[f"sentence-transformers encode (batch {bs})"] = best
        best = float("inf")
        got = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            got = np.array([o.outputs.embedding for o in llm.embed(texts)])
            best = min(best, time.perf_counter() - start)
        results["kvik LLM.embed"] = best
        assert ref is not None and got is not None
        cos = float(((got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)).min())
    print(
        f"{args.num_texts} texts, {tokens} tokens (mean {tokens / args.num_texts:.0f}); min cosine kvik vs ST {cos:.6f}"
    )
    print("| system | best s | sequences/s | tokens/s |\n| --- | --- | --- | --- |")
    for name, secs in results.items():
        print(f"| {name} | {secs:.2f} | {args.num_texts / secs:.1f} | {tokens / secs:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
