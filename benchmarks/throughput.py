"""Offline throughput: kvik vs HF transformers static-batch generate, same workload, same run.

    python benchmarks/throughput.py --shape smollm2-135m --num-requests 32 --input-len 16:256 --output-len 64
    python benchmarks/throughput.py --systems kvik,kvik-fallback,kvik,kvik-fallback   # native vs the transformers fallback

Systems: ``kvik`` (native model code), ``kvik-fallback`` (``model_impl="transformers"``: transformers'
modelling code on kvik's paged cache and scheduler), ``hf`` (transformers' static-batch generate).

Each system runs in its own process (so peak RSS is its own). Prints a table; --json-out saves it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import build_model, peak_rss_mib, percentiles, print_table, run_isolated, workload


def _kvik(args: argparse.Namespace, model: Path, prompts: list[list[int]]) -> dict:
    import torch
    from kvik import LLM, SamplingParams

    kwargs = dict(
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
        model_impl="transformers" if args._worker == "kvik-fallback" else "auto",
    )
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = int(args.kv_cache_memory)
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    llm = LLM(str(model), **kwargs)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    engine.scheduler.reset_prefix_cache()
    start = time.perf_counter()
    t0 = time.time()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params, arrival_time=t0)
    outputs = {}
    used_slots = allocated_slots = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        # KV utilisation: tokens held / slots in the blocks held, summed over steps.
        kv = engine.scheduler.kv_cache
        for request in engine.scheduler.running:
            blocks = kv.get_blocks(request.request_id)
            used_slots += request.num_computed_tokens
            allocated_slots += len(blocks) * engine.config.block_size
    elapsed = time.perf_counter() - start
    stats = engine.get_stats()
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs.values()]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
        for o in outputs.values()
    ]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    return dict(
        system=args._worker,
        elapsed_s=elapsed,
        out_tokens=out_tokens,
        ttft_ms=percentiles([t * 1000 for t in ttft]),
        tpot_ms=percentiles([t * 1000 for t in tpot]),
        kv_util=used_slots / allocated_slots if allocated_slots else float("nan"),
        prefix_hit_rate=stats.prefix_cache_hit_rate,
        preemptions=stats.num_preemptions,
    )


def _hf(args: argparse.Namespace, model: Path, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else "float32")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(args.device if args.device != "cpu" else "cpu")
    hf.eval()
    hf.generation_config.eos_token_id = None
    batch = args.hf_batch_size or len(prompts)

    def run(chunk: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids.to(hf.device),
                attention_mask=mask.to(hf.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - width) * len(chunk)

    run(prompts[:2], 4)  # warm-up
    start = time.perf_counter()
    out_tokens = sum(run(prompts[i : i + batch], args.output_len) for i in range(0, len(prompts), batch))
    elapsed = time.perf_counter() - start
    return dict(system=f"hf-generate (static batch {batch})", elapsed_s=elapsed, out_tokens=out_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--model", default=None, help="an existing checkpoint instead of a random --shape")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", default="16:256", help="min:max prompt tokens (uniform)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--block-size", type=int, default=None, help="KV block size (default: the platform's)")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--hf-batch-size", type=int, default=None)
    parser.add_argument("--systems", default="kvik,hf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_model-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lo, hi = (int(x) for x in args.input_len.split(":"))

    if args._worker:  # child process: run one system, print JSON
        from transformers import AutoConfig

        model = Path(args._model_path)
        vocab = AutoConfig.from_pretrained(model).vocab_size
        prompts = workload(args.num_requests, (lo, hi), vocab, seed=args.seed)
        result = (_kvik if args._worker.startswith("kvik") else _hf)(args, model, prompts)
        result["prompt_tokens"] = sum(len(p) for p in prompts)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return

    root = Path(tempfile.gettempdir()) / "kvik-bench-models"
    model = Path(args.model) if args.model else build_model(args.shape, root, "float32")
    rows = []
    passthrough = sys.argv[1:]
    for system in args.systems.split(","):
        print(f"running {system} ...", file=sys.stderr, flush=True)
        r = run_isolated([__file__, *passthrough, "--_worker", system, "--_model-path", str(model)])
        r["req_per_s"] = args.num_requests / r["elapsed_s"]
        r["out_tok_per_s"] = r["out_tokens"] / r["elapsed_s"]
        r["total_tok_per_s"] = (r["out_tokens"] + r["prompt_tokens"]) / r["elapsed_s"]
        for key in ("ttft_ms", "tpot_ms"):
            if key in r:
                r[f"{key}_p50"], r[f"{key}_p99"] = r[key]["p50"], r[key]["p99"]
        rows.append(r)
    print(
        f"\nmodel {args.model or args.shape} ({args.dtype}), {args.num_requests} requests, prompts {lo}-{hi} "
        f"tokens, {args.output_len} output tokens, device {args.device}"
    )
    print_table(
        rows,
        [
            "system",
            "elapsed_s",
            "req_per_s",
            "out_tok_per_s",
            "total_tok_per_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "tpot_ms_p50",
            "tpot_ms_p99",
            "kv_util",
            "prefix_hit_rate",
            "peak_rss_mib",
        ],
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
