"""Long prompts on one GPU: time to first token and batch-1 decode at 8k, 32k and 128k tokens (issue 21).

    python benchmarks/long_context_gpu.py [--lengths 8192,32768,131072] [--new 64] [--systems kvik,hf]

The Llama-3.1-8B shape with its llama3 rope scaling (128k positions), random bf16 weights, one request:

* **TTFT** and **decode ms/token**: a fresh prompt of L random tokens (no prefix-cache hit) and ``--new``
  new tokens; TTFT from arrival to the first token, decode from the first token to the last over
  ``new - 1`` tokens (kvik's request metrics; a streamer's timestamps for transformers), best of
  ``--repeats``. kvik prefills in chunks of its step budget, transformers in one forward.

Floors from this GPU's measured ceilings (``gpu_common.measure_ceilings``): TTFT >= the prefill's FLOPs
(linears 2 x params x L, causal attention 2 x L^2 x hidden x layers) / the bf16 GEMM rate; decode >= (weights
+ K/V of L tokens) / the copy bandwidth. Each system runs in its own process (kvik reserves most of the
GPU's memory); results go to ``$OUT/long_context.jsonl``. ``--device cpu --shape tiny`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from gpu_common import SHAPES, dummy_model_dir, kv_bytes_per_token, measure_ceilings, sync, weight_bytes

# Llama 3.1's scaling of its 8k-trained rope to 128k positions (its config.json's values).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip


def config_dir(shape: str, root: Path) -> Path:
    """config.json with the llama3 rope scaling, and a word tokenizer: what ``load_format="dummy"`` reads."""
    return dummy_model_dir(root, shape, "long", rope_scaling=LLAMA3_ROPE)


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(1, vocab, size=length).tolist()


def floors(shape: str, length: int, device: str) -> dict[str, float]:
    """The hardware limits of one request at this length (ms), from this device's measured ceilings."""
    if device != "cuda":
        return {}
    s = SHAPES[shape]
    ceilings = measure_ceilings()
    params = weight_bytes(shape) / 2
    hidden, layers = s["hidden_size"], s["num_hidden_layers"]
    prefill_flops = 2 * params * length + 2 * length**2 * hidden * layers
    decode_bytes = weight_bytes(shape) + length * kv_bytes_per_token(shape)
    return {"ttft_floor_ms": round(prefill_flops / ceilings["bf16_gemm_flops"] * 1e3, 1),
            "decode_floor_ms": round(decode_bytes / ceilings["copy_bytes_per_s"] * 1e3, 3)}  # fmt: skip


def run_kvik(args: argparse.Namespace, lengths: list[int], emit: Any) -> None:
    import kvik

    path = config_dir(args.shape, Path(args.root))
    max_len = SHAPES[args.shape]["max_position_embeddings"]
    t0 = time.perf_counter()
    llm = kvik.LLM(str(path), device=args.device, dtype="bfloat16", load_format="dummy", max_model_len=max_len,
                   max_num_seqs=4)  # fmt: skip
    start_s = time.perf_counter() - t0
    vocab = SHAPES[args.shape]["vocab_size"]
    engine = llm.llm_engine

    def timed(ids: list[int], new: int) -> tuple[float, float]:
        """(TTFT, decode s/token) of one request."""
        params = kvik.SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        out = llm.generate([ids], params, use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == new
        m = out.metrics
        return m.first_token_time - m.arrival_time, (m.finished_time - m.first_token_time) / (new - 1)

    timed(prompt(512, vocab, 0), 8)  # warm-up: kernels compiled, graphs replayed
    for length in lengths:
        runs = [timed(prompt(length, vocab, 100 * length + r), args.new) for r in range(args.repeats)]
        emit(system="kvik", length=length, ttft_ms=round(min(r[0] for r in runs) * 1e3, 1),
             decode_ms=round(min(r[1] for r in runs) * 1e3, 3), start_s=round(start_s, 1),
             max_num_batched_tokens=engine.config.max_num_batched_tokens, **floors(args.shape, length, args.device))  # fmt: skip


def run_hf(args: argparse.Namespace, lengths: list[int], emit: Any) -> None:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    cfg = transformers.AutoConfig.from_pretrained(config_dir(args.shape, Path(args.root)))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    vocab = cfg.vocab_size

    class Clock(BaseStreamer):
        """The time of each ``put`` (the prompt first, then one call per new token)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            sync()
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def timed(ids: list[int], new: int) -> tuple[float, float]:
        x = torch.tensor([ids], device=args.device)
        clock = Clock()
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, eos_token_id=None, streamer=clock)  # fmt: skip
        assert out.shape[1] == len(ids) + new and len(clock.times) == new + 1
        return clock.times[1] - t, (clock.times[-1] - clock.times[1]) / (new - 1)

    timed(prompt(512, vocab, 0), 8)
    for length in lengths:
        try:
            runs = [timed(prompt(length, vocab, 100 * length + r), args.new) for r in range(args.repeats)]
            emit(system="transformers", version=transformers.__version__, length=length,
                 ttft_ms=round(min(r[0] for r in runs) * 1e3, 1), decode_ms=round(min(r[1] for r in runs) * 1e3, 3),
                 attn=model.config._attn_implementation)  # fmt: skip
        except torch.OutOfMemoryError as exc:
            emit(system="transformers", length=length, error=f"out of memory: {str(exc)[:200]}")
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,32768,131072", help="prompt lengths (capped to the positions left)")
    ap.add_argument("--new", type=int, default=64, help="decoded tokens per decode measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--systems", default="kvik,hf")
    ap.add_argument("--shape", default="llama8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--limit", type=int, default=280, help="seconds per system")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this system in this process
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/kvik_out")) / "long_context.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    room = SHAPES[args.shape]["max_position_embeddings"] - args.new - 2
    lengths = [min(int(n), room) for n in args.lengths.split(",")]

    def emit(**record: Any) -> None:
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print("RESULT " + json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if args.one:
        {"kvik": run_kvik, "hf": run_hf}[args.one](args, lengths, emit)
        return
    for system in args.systems.split(","):
        print(f"=== {system} {time.strftime('%H:%M:%S')}", flush=True)
        argv = [sys.executable, __file__, "--one", system, *sys.argv[1:]]
        try:
            proc = subprocess.run(argv, timeout=args.limit, capture_output=True, text=True)
            sys.stdout.write(proc.stdout[-4000:])
            if proc.returncode != 0:
                emit(system=system, error=f"exit {proc.returncode}", stderr_tail=proc.stderr[-2000:])
        except subprocess.TimeoutExpired as exc:
            sys.stdout.write((exc.stdout or b"").decode()[-4000:] if isinstance(exc.stdout, bytes) else "")
            emit(system=system, error=f"timed out after {args.limit} s")
        except Exception:  # one system's failure must not lose the other's results
            emit(system=system, error=traceback.format_exc()[-2000:])


if __name__ == "__main__":
    main()
