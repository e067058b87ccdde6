"""KV blocks a windowed model holds: KV-cache groups (blocks behind a window released) against one table.

    python benchmarks/kv_cache_groups.py                                  # tiny Gemma 3 on CPU, ~1 minute
    python benchmarks/kv_cache_groups.py --arch mistral --window 128      # every layer slides
    python benchmarks/kv_cache_groups.py --device cuda --shape gemma3_1b --kv-cache-gib 4 \\
        --num-requests 256 --input-len 2048,4096 --output-len 256        # the Gemma-3-1B shape, dummy weights

Same engine and the same KV-cache memory in both modes, each mode in a process of its own, alternating:

- ``grouped`` (the default): sliding and global layers in KV-cache groups (kvik.scheduling.kv_cache_groups),
  a sliding group releasing what its window has passed;
- ``one-table``: every layer in one block table that keeps every block (what kvik did before the groups; the
  runner's planner is patched to refuse the split, and for a model whose layers all slide, the release).

Reported per run: blocks in the pool, the peak of requests running at once, preemptions, engine steps,
output tokens/s, and whether the greedy tokens agree between the modes (float32 runs only: in bf16 a
different batch mix may round differently).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Gemma-3-1B (text): 26 layers, five sliding (512 tokens) to one global, one 256-wide KV head
    "gemma3_1b": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=6912, vocab_size=262144,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        sliding_window=512, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
}  # fmt: skip


def _model_dir(args: argparse.Namespace, root: Path) -> Path:
    if args.shape == "tiny":
        from kvik.testing.tiny_models import make_tiny_model

        extra: dict[str, Any] = dict(sliding_window=args.window, max_position_embeddings=4096)
        if args.arch != "mistral":
            extra.update(num_hidden_layers=7 if args.arch == "gemma3" else 4, head_dim=32, query_pre_attn_scalar=32)
        return make_tiny_model(root / args.arch, arch=args.arch, **extra)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_common import word_tokenizer

    path = root / f"{args.shape}-config"
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[args.shape], torch_dtype="bfloat16", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    word_tokenizer(cfg["vocab_size"]).save_pretrained(path)
    return path


def _one_table() -> None:
    """Make the runner keep one table for every layer, and (every layer sliding) release nothing."""
    import kvik.worker.torch_runner as torch_runner
    from kvik.scheduling.kv_cache_groups import KVCacheGroups

    torch_runner.plan_kv_cache_groups = lambda windows, **_: KVCacheGroups.single(len(windows))  # type: ignore[assignment]


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from kvik import LLM, SamplingParams

    if args.mode == "one-table":
        _one_table()
    if args.device == "cpu":
        torch.set_num_threads(args.num_threads)
    cuda = args.device == "cuda"
    llm = LLM(args.model, device=args.device, dtype="bfloat16" if cuda else "float32", block_size=args.block_size,
              kv_cache_memory=int(args.kv_cache_gib * 2**30), max_num_seqs=args.num_requests,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              load_format="dummy" if args.shape != "tiny" else "auto")  # fmt: skip
    engine = llm.llm_engine
    lo, hi = map(int, args.input_len.split(","))
    rng = np.random.default_rng(1)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in rng.integers(lo, hi + 1, size=args.num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    kv = engine.scheduler.kv_cache
    peak_running, peak_blocks, steps, tokens = 0, 0, 0, {}
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        steps += 1
        peak_running = max(peak_running, len(engine.scheduler.running))
        peak_blocks = max(peak_blocks, kv.pool.num_usable_blocks - kv.num_free_blocks)
    wall = time.perf_counter() - start
    return {
        "mode": args.mode,
        "group_windows": list(engine.scheduler.group_windows),
        "kv_tensors": engine.runner.kv_cache_groups().num_tensors if engine.runner is not None else None,
        "pool_blocks": kv.pool.num_usable_blocks,
        "peak_blocks_held": peak_blocks,
        "peak_running": peak_running,
        "preemptions": engine.scheduler.get_stats().num_preemptions,
        "steps": steps,
        "wall_s": round(wall, 2),
        "out_tok_s": round(args.num_requests * args.output_len / wall, 1),
        "tokens": [tokens[f"r{i}"] for i in range(args.num_requests)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="gemma3", choices=["gemma3", "gemma2", "mistral"], help="tiny shape only")
    ap.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window", type=int, default=64, help="tiny shape only")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-gib", type=float, default=0.01)
    ap.add_argument("--num-requests", type=int, default=8)
    ap.add_argument("--input-len", default="96,192", help="prompt lengths, uniform in [lo, hi]")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="", help="also append the records (JSON lines) to this file")
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:  # a child: one run
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_dir(args, Path(tmp))
        rows = []
        for _ in range(args.rounds):
            for mode in ("grouped", "one-table"):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--model", str(model)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{mode} run failed:\n{done.stderr[-4000:]}")
                rows.append(json.loads(lines[-1][len("RESULT ") :]))
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    records = []
    for r in rows:
        r.pop("tokens")
        records.append(r)
    records.append({"tokens_identical": same, **{k: v for k, v in vars(args).items() if k not in ("mode", "model")}})
    for r in records:
        print(json.dumps(r))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
