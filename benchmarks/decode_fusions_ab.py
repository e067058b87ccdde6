"""Batch-1 decode with each of the decode-step fusions switched off in turn, on the 8B and Qwen3-30B-A3B
shapes (random weights, ``load_format="dummy"``): q/k rotary (and Qwen3's q/k norms) inside the Triton
attention kernel (``no_rotary``: the separate rotary kernel), and SiLU inside the one-row gate/up GEMV
(``no_gated_mlp``: the SiLU kernel; Qwen3-30B-A3B has no dense MLP, so it skips this one), and the GEMV's
config for wide weights (``one_gemv_config``: the default for every shape); ``splits_4`` / ``splits_8`` fix decode
attention's KV split count (the planner picks 16 at max_model_len 2048). ``VARIANTS=all,no_rotary`` picks
some, ``ROUNDS=3`` repeats them more.

    python3 benchmarks/decode_fusions_ab.py llama8b,qwen3_30b_a3b   # H200: ~9 min; $OUT/decode_fusions_ab.json

Each variant runs in its own process, twice, the variants interleaved (all, no_rotary, ..., all, no_rotary,
...), so drift of the machine shows as a difference between the two runs of one variant. Each process:
ms/token of 128 new tokens after a 512-token prompt (best of three; the prompt's step subtracted), the floor
as models_gpu.py computes it, and the greedy tokens of one prompt, compared with the all-on variant's (random
weights put near-ties everywhere, so a variant that is not bit-identical parts from it within a few tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


VARIANTS = ("all", "no_rotary", "no_gated_mlp", "one_gemv_config", "splits_4", "splits_8")


def batch1(shape: str, variant: str) -> dict[str, object]:
    """Run in its own process: ms/token, the floor and the greedy tokens with ``variant``'s fusion off."""
    import kvik
    from gpu_common import batch1_decode_ms, measure_ceilings, workload
    from kvik import SamplingParams
    from models_gpu import CONFIGS, active_weight_bytes, config_dir, kv_bytes

    if variant == "no_rotary":
        from kvik_triton_attention.backend import TritonAttentionBackend

        TritonAttentionBackend.fuses_rotary = lambda self, kv_cache, metadata: False  # type: ignore[method-assign]
    elif variant == "no_gated_mlp":
        from kvik.models.llama import LlamaMLP
        from kvik_cuda import fused

        del fused._FUSED[LlamaMLP]
    elif variant == "one_gemv_config":  # the default GEMV config for every shape, not WIDE_CONFIG for wide ones
        from kvik_cuda import gemv

        gemv.config_for = lambda n, k: gemv.DenseGemvConfig()
    elif variant.startswith("splits_"):  # a fixed KV split count for decode attention, not the planned one
        from kvik_triton_attention.backend import TritonAttentionBackend

        TritonAttentionBackend.force_num_splits = int(variant.removeprefix("splits_"))
    path = config_dir(shape, Path("/tmp/kvik_models"))
    vocab = CONFIGS[shape]["vocab_size"]
    llm = kvik.LLM(model=str(path), load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=32,
                   gpu_memory_utilization=0.9, seed=0)  # fmt: skip
    ms = batch1_decode_ms(llm, vocab)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    tokens = llm.generate(workload(1, vocab, 512, 512, seed=3), params, use_tqdm=False)[0].outputs[0].token_ids
    # The floor as models_gpu.py computes it: the active weights and ~640 tokens of KV at this machine's copy
    # bandwidth, measured now.
    model = llm.llm_engine.runner.model
    floor_ms = (active_weight_bytes(model) + kv_bytes(CONFIGS[shape], 640)) / measure_ceilings()["copy_bytes_per_s"] * 1e3
    return {"ms_per_token": round(ms, 3), "floor_ms": round(floor_ms, 3), "x_floor": round(ms / floor_ms, 3),
            "tokens": list(tokens)}  # fmt: skip


def main() -> None:
    shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["llama8b", "qwen3_30b_a3b"]
    result: dict[str, dict[str, object]] = {}
    for shape in shapes:
        variants = tuple(v for v in VARIANTS if v in os.environ.get("VARIANTS", ",".join(VARIANTS)).split(","))
        if shape == "qwen3_30b_a3b":
            variants = tuple(v for v in variants if v != "no_gated_mlp")
        runs: dict[str, list[dict[str, object]]] = {v: [] for v in variants}
        for variant in variants * int(os.environ.get("ROUNDS", "2")):
            code = f"import sys; sys.path.insert(0, 'benchmarks'); import json, decode_fusions_ab as p; " \
                   f"print('RESULT', json.dumps(p.batch1({shape!r}, {variant!r})))"  # fmt: skip
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
            line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
            got = json.loads(line[-1][7:]) if line else {"error": run.stderr[-1500:]}
            runs[variant].append(got)
            print(shape, variant, got.get("ms_per_token", got.get("error")), got.get("x_floor"), flush=True)
        row: dict[str, object] = {v: [r.get("ms_per_token") for r in rs] for v, rs in runs.items()}
        row["x_floor"] = {v: [r.get("x_floor") for r in rs] for v, rs in runs.items()}
        reference = runs["all"][0].get("tokens")
        for variant in variants[1:]:
            tokens = runs[variant][0].get("tokens")
            if isinstance(reference, list) and isinstance(tokens, list):
                # Greedy tokens agree up to the first difference; after it the two sequences part for good.
                pairs = enumerate(zip(reference, tokens, strict=True))
                row[f"tokens_agree_{variant}"] = f"{next((i for i, (a, b) in pairs if a != b), len(tokens))}/{len(tokens)}"
        result[shape] = row
        print("RESULT", shape, json.dumps(row), flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "decode_fusions_ab.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
