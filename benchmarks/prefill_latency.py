"""Time to first token of prompt batches on a GPU: piecewise CUDA graphs on and off, and transformers' forward.

    python benchmarks/prefill_latency.py --shape smollm2 [--cases 1x128,1x512,8x128,4x1024,32x256] [--repeats 20]

A random-weight bf16 checkpoint of the shape (benchmarks/gpu_common.py) is loaded once; each case is ``B``
prompts of ``L`` random tokens generated with ``max_tokens=1`` (one prefill step when ``B * L`` fits the step
budget), prefix caching off so every call computes its prompts. Variants switch the loaded engine in place:
``piecewise`` (the default engine: the step padded to a captured size and replayed as piecewise graphs around
eager attention) and ``eager`` (``runner.piecewise_sizes`` emptied: the step runs unpadded, kernel by kernel).
The peer is transformers' forward over the same batch (SDPA, last position's logits only) on the same GPU.
Records (median and 10th/90th percentile ms of ``--repeats`` timed calls) go to $OUT/prefill_latency_<shape>.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import SHAPES, Recorder, sync, write_random_checkpoint


def _timed(call: Any, repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p10_ms": round(times[len(times) // 10], 3),
        "p90_ms": round(times[(9 * len(times)) // 10], 3),
    }


def _hf_forward(model: Any, ids: Any) -> None:
    import torch

    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1).logits.argmax(-1).cpu()  # the first token, on the host


def run(args: argparse.Namespace) -> None:
    import kvik
    import torch
    from kvik import SamplingParams

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kvik_cuda.runner").setLevel(logging.INFO)  # the capture's line: graphs and seconds
    record = Recorder(f"prefill_latency_{args.shape}")
    path = write_random_checkpoint(args.shape, Path(args.root))
    t0 = time.perf_counter()
    llm = kvik.LLM(model=str(path), dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False,
                   gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    runner = llm.llm_engine.runner
    sizes = list(runner.piecewise_sizes)
    record(event="engine", shape=args.shape, init_s=round(time.perf_counter() - t0, 1), piecewise_sizes=len(sizes),
           largest=sizes[-1] if sizes else 0, device=torch.cuda.get_device_name(),
           frozen_objects=gc.get_freeze_count())  # fmt: skip
    hf = None
    if args.hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        hf.eval()
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(7)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    for case in args.cases.split(","):
        batch, length = (int(x) for x in case.split("x"))
        prompts = [rng.integers(1, vocab, size=length).tolist() for _ in range(batch)]
        results: dict[str, Any] = {}
        for variant in args.variants.split(","):
            runner.piecewise_sizes = sizes if variant == "piecewise" else []
            before = runner.piecewise_replays
            results[variant] = _timed(partial(llm.generate, prompts, params, use_tqdm=False), args.repeats)
            results[variant]["piecewise_replays"] = runner.piecewise_replays - before
        runner.piecewise_sizes = sizes
        if hf is not None:
            results["transformers"] = _timed(
                partial(_hf_forward, hf, torch.tensor(prompts, device="cuda")), args.repeats
            )
        record(event="prefill", shape=args.shape, batch=batch, prompt_len=length, tokens=batch * length, **results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--cases", default="1x128,1x512,8x128,4x1024,32x256", help="BxL: B prompts of L tokens each")
    ap.add_argument("--variants", default="piecewise,eager")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)  # room for transformers' copy
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' forward")
    ap.add_argument("--root", default="/tmp/kvik_models")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
