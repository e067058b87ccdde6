"""Batch-1 decode with q/k rotary (and Qwen3's q/k norms) inside the Triton attention kernel vs the separate
rotary kernel, on the 8B and Qwen3-30B-A3B shapes (random weights, ``load_format="dummy"``).

    python3 benchmarks/rotary_in_attention_ab.py llama8b,qwen3_30b_a3b   # H200: ~7 min; $OUT/rotary_ab.json

Each shape runs in four processes, inside / outside / inside / outside, so drift of the machine shows as a
difference between the two runs of one variant. Each process: ms/token of 128 new tokens after a 512-token
prompt (best of three; the prompt's step subtracted) and the greedy tokens of one prompt, compared across
variants (the 8B has no q/k norm, so its rotation is elementwise and the tokens should match exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def batch1(shape: str, inside: bool) -> dict[str, object]:
    """Run in its own process: ms/token and the greedy tokens with rotary inside attention or not."""
    import kvik
    from gpu_common import measure_ceilings, sync, workload
    from kvik import SamplingParams
    from models_gpu import CONFIGS, active_weight_bytes, config_dir, kv_bytes

    if not inside:
        from kvik_triton_attention.backend import TritonAttentionBackend

        TritonAttentionBackend.fuses_rotary = lambda self, kv_cache, metadata: False  # type: ignore[method-assign]
    path = config_dir(shape, Path("/tmp/kvik_models"))
    vocab = CONFIGS[shape]["vocab_size"]
    llm = kvik.LLM(model=str(path), load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=32,
                   gpu_memory_utilization=0.9, seed=0)  # fmt: skip

    def timed(seed: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        sync()
        t = time.perf_counter()
        llm.generate(workload(1, vocab, 512, 512, seed=seed), params, use_tqdm=False)
        sync()
        return time.perf_counter() - t

    timed(99, 16)
    best = min((timed(s + 1, 129) - timed(s, 1)) / 128 for s in (7, 9, 11))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    tokens = llm.generate(workload(1, vocab, 512, 512, seed=3), params, use_tqdm=False)[0].outputs[0].token_ids
    # The floor as models_gpu.py computes it: the active weights and ~640 tokens of KV at this machine's copy
    # bandwidth, measured now.
    model = llm.llm_engine.runner.model
    floor_ms = (active_weight_bytes(model) + kv_bytes(CONFIGS[shape], 640)) / measure_ceilings()["copy_bytes_per_s"] * 1e3
    return {"ms_per_token": round(best * 1e3, 3), "floor_ms": round(floor_ms, 3),
            "x_floor": round(best * 1e3 / floor_ms, 3), "tokens": list(tokens)}  # fmt: skip


def main() -> None:
    shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["llama8b", "qwen3_30b_a3b"]
    result: dict[str, dict[str, object]] = {}
    for shape in shapes:
        runs: dict[str, list[dict[str, object]]] = {"inside": [], "outside": []}
        for inside in (True, False, True, False):
            code = f"import sys; sys.path.insert(0, 'benchmarks'); import json, rotary_in_attention_ab as p; " \
                   f"print('RESULT', json.dumps(p.batch1({shape!r}, {inside})))"  # fmt: skip
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
            line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
            got = json.loads(line[-1][7:]) if line else {"error": run.stderr[-1500:]}
            runs["inside" if inside else "outside"].append(got)
            print(shape, "inside" if inside else "outside", got.get("ms_per_token", got.get("error")),
                  got.get("x_floor"), flush=True)  # fmt: skip
        row: dict[str, object] = {variant: [r.get("ms_per_token") for r in rs] for variant, rs in runs.items()}
        inside_tokens, outside_tokens = runs["inside"][0].get("tokens"), runs["outside"][0].get("tokens")
        if isinstance(inside_tokens, list) and isinstance(outside_tokens, list):
            # Greedy tokens agree up to the first difference; after it the two sequences part for good.
            pairs = enumerate(zip(inside_tokens, outside_tokens, strict=True))
            agree = next((i for i, (a, b) in pairs if a != b), len(inside_tokens))
            row["tokens_agree"] = f"{agree}/{len(inside_tokens)}"
        result[shape] = row
        print("RESULT", shape, json.dumps(row), flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "rotary_ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
