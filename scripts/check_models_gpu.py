"""Every native architecture (and the transformers fallback) on a GPU: kvik's greedy tokens vs transformers.

    python scripts/check_models_gpu.py [--device cuda] [--out results.jsonl]

The tiny random checkpoints of tests/core/models/test_native_vs_hf.py (and of the fallback test) run in
float32 through the GPU platform as users get it: the platform's attention backend (Triton), CUDA graphs,
fused layers (the fused MoE kernel for the MoE models), async scheduling. The reference is transformers
in float32 on the CPU. Prints one JSON line per case; exits 1 if any case differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def divergences(path: Path, prompts: list[list[int]], got: list[list[int]], reference: list[list[int]],
                device: str) -> list[dict[str, Any]]:
    """Where each differing prompt first diverges, and the reference's float32 logits there: a gap of ~1e-6
    between kvik's token and the reference's is a tie that any change of summation order may break, a large
    gap is a bug."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device).eval()
    found = []
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        if g == r:
            continue
        step = next(k for k, (a, b) in enumerate(zip(g, r, strict=False)) if a != b)
        ids = torch.tensor([prompts[i] + r[:step]], device=device)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        found.append({"prompt": i, "step": step, "kvik_token": g[step], "reference_token": r[step],
                      "reference_logit_gap": float(logits[r[step]] - logits[g[step]]),
                      "reference_top2_gap": float(top2.values[0] - top2.values[1])})  # fmt: skip
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--attention-backend", default=None, help="force a backend (default: the platform's)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--hf-device", default="cpu", help="where the transformers reference runs")
    ap.add_argument("--no-fused-layers", action="store_true", help="the platform's plain torch layers (fused_layers off)")
    args = ap.parse_args()

    from kvik import LLM, SamplingParams
    from kvik.testing.reference import hf_greedy
    from kvik.testing.tiny_models import make_tiny_model

    native = _load(REPO / "tests/core/models/test_native_vs_hf.py")
    fallback = _load(REPO / "tests/core/models/test_transformers_fallback.py")
    root = Path(tempfile.mkdtemp(prefix="kvik_gpu_models_"))
    cases: list[tuple[str, Path, list[list[int]], int]] = []
    for name, overrides in native.CASES.items():
        path = make_tiny_model(root / name, **overrides)
        prompts = native.prompts()
        cases.append((name, path, prompts, native.NEW_TOKENS))
    for name in fallback.FALLBACK_CASES:
        path = fallback._checkpoint(root, name)
        cases.append((f"fallback-{name}", path, fallback.PROMPTS, fallback.NEW_TOKENS))

    wanted = {c for c in args.cases.split(",") if c}
    cases = [c for c in cases if not wanted or c[0] in wanted]
    failed = 0
    for name, path, prompts, new_tokens in cases:
        start = time.perf_counter()
        reference = hf_greedy(path, prompts, new_tokens, device=args.hf_device)
        record: dict[str, Any] = {"case": name}
        try:
            llm = LLM(str(path), device=args.device, dtype="float32", max_model_len=128, num_kv_blocks=256,
                      block_size=16, max_num_seqs=8, attention_backend=args.attention_backend,
                      enforce_eager=args.enforce_eager,
                      platform_options={"fused_layers": False} if args.no_fused_layers else {})  # fmt: skip
            engine = llm.llm_engine
            params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            record.update(
                backend=engine.config.attention_backend,
                graphs=len(getattr(engine.runner, "graphs", {})),
                async_scheduling=engine.async_scheduling,
                architecture=engine.model_config.architecture,
                identical=got == reference,
                differing_prompts=[i for i, (g, r) in enumerate(zip(got, reference, strict=True)) if g != r],
            )
            if got != reference:
                record["divergences"] = divergences(path, prompts, got, reference, args.hf_device)
            del llm
        except Exception as exc:  # report every case, then fail
            record.update(identical=False, error=f"{type(exc).__name__}: {exc}"[:500])
        record["seconds"] = round(time.perf_counter() - start, 1)
        failed += not record["identical"]
        line = json.dumps(record)
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print(f"{len(cases) - failed} identical, {failed} differ", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
