"""Quantized serving on one GPU (H100/H200): bf16 vs FP8 W8A8 vs INT4 in the same run, plus kernel numerics.

From the repository root on the GPU machine (no network needed; about 6 minutes on an H200)::

    pip install -q --no-deps --no-build-isolation -e core -e platforms/cuda -e attention_backends/triton \
        -e quantization/quant && python benchmarks/quant_benchmark.py

1. ``kernels``: each GPU kernel against its torch reference on Llama-8B linear shapes
   (``torch._scaled_mm`` FP8 vs dequantize-then-matmul; the Triton INT4 kernel vs the
   dequantized bf16 weight, with and without act-order), and their times vs bf16 ``F.linear``.
2. For each of ``bf16``, ``fp8`` (``quantization="fp8"``), ``int4`` (``quantization="int4"``,
   round-to-nearest groups of 128 through the GPTQ/AWQ kernel) and ``int8`` (W8A8, ``torch._int_mm``),
   in its own process: the
   Llama-3.1-8B-shaped random checkpoint quantized at load, batch-1 decode ms/token (512-token
   prompt, CUDA graphs) and offline throughput on ``--n`` requests (prompts U[128, 1024],
   ``--out-len`` new tokens, greedy, EOS ignored). ``fp8_old_row`` / ``int8_old_row``: the same with the
   one-row W8A16 GEMV config it had before run u (``W8GemvConfig()``), its A/B in the same run.
   ``fp8_unfused`` / ``int8_unfused``: the same with the MLP's SiLU-and-mul writing 16-bit values for the
   down projection to quantize itself (``kvik_cuda.act_quant`` off), its A/B in the same run.

Each part runs under its own time limit and a failure is recorded, not fatal. Prints one JSON
summary at the end and writes it to $OUT/quant_benchmark.json (and the JSON lines to
$OUT/quant_<part>.jsonl).
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
for pkg in ("core", "platforms/cuda", "platforms/cpu", "attention_backends/triton", "quantization/quant"):
    sys.path.insert(0, str(ROOT / pkg))  # the checkout's packages win over installed copies

# Llama-3.1-8B: (name, K, N) of each linear layer's matmul.
LINEARS = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def _ensure_quant_plugin() -> None:
    """Register kvik-quant when it is on the path but not installed as an entry point."""
    from kvik.plugins.manager import get_plugin_manager

    manager = get_plugin_manager()
    if "fp8" not in manager.quantization_methods:
        import kvik_quant.plugin

        manager.register(kvik_quant.plugin, "quant", "kvik-quant")


# -- part 1: kernels ----------------------------------------------------------------------------------
def kernels() -> dict[str, Any]:
    import torch
    from kvik_quant import fp8_ops, int4_pack
    from kvik_quant.int4 import rtn_quantize

    results: dict[str, Any] = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, k, n in LINEARS:
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float32) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        wq, ws = fp8_ops.quantize_weight_per_channel(w)
        codes, scales, zeros = rtn_quantize(w, 128, symmetric=True)
        qweight = int4_pack.pack_rows(codes.t())
        s_t, z_t = scales.t().to(torch.bfloat16).contiguous(), zeros.t().to(torch.bfloat16).contiguous()
        w_int4 = int4_pack.dequantize_codes(codes.t(), s_t, z_t, 128, torch.bfloat16)  # [K, N]
        for m in (1, 16, 256, 2048):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            results[f"{name}_m{m}"] = _kernel_row(x, w_bf16, wq, ws, qweight, s_t, z_t, w_int4)
        # act-order through the GPTQ layer: kernel path vs the layer's own torch reference path.
        try:
            results[f"{name}_act_order_rel_err"] = _act_order_check(k, n, gen)
        except Exception as exc:
            results[f"{name}_act_order_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    ok = all(
        max(v.get("fp8_rel_err", 1), v.get("int4_rel_err", 1), v.get("int8_rel_err", 1)) < 0.02
        for v in results.values()
        if isinstance(v, dict)
    )
    import kvik_quant.int4_kernel

    results["int4_wide_load"] = kvik_quant.int4_kernel._wide_load  # False: the fallback variant ran
    act_order = [v for k, v in results.items() if k.endswith("act_order_rel_err")]
    return {"numerics_ok": ok and len(act_order) == len(LINEARS) and all(v < 0.02 for v in act_order),
            "by_shape": results}  # fmt: skip


def _kernel_row(x: Any, w_bf16: Any, wq: Any, ws: Any, qweight: Any, s_t: Any, z_t: Any, w_int4: Any) -> dict[str, Any]:
    """Errors against the torch references and microseconds per call, for one activation batch ``x``.

    Each kernel is measured on its own: one that fails records its error and the others still run.
    """
    import torch
    import torch.nn.functional as F
    import triton.testing
    from kvik_quant import fp8_ops, int8
    from kvik_quant.act_quant_kernel import quantize_rows
    from kvik_quant.int4_kernel import int4_matmul

    def bench(fn: Any) -> float:
        return round(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3, 1)

    def rel(got: Any, ref: Any) -> float:
        return float((got.float() - ref.float()).norm() / ref.float().norm())

    row: dict[str, Any] = {"bf16_us": bench(lambda: F.linear(x, w_bf16))}

    def fp8() -> None:
        xq, xs = fp8_ops.quantize_per_token(x)
        got = fp8_ops.scaled_mm(xq, xs, wq, ws.view(1, -1), torch.bfloat16)
        row["fp8_rel_err"] = rel(got, fp8_ops.reference_mm(xq, xs, wq, ws[:, None], torch.float32))
        kq, ks = quantize_rows(x, fp8_ops.FP8, fp8_ops.FP8_MAX, fp8_ops.MIN_SCALE)
        row["fp8_act_quant_kernel_mismatches"] = int((kq.float() != xq.float()).sum()) + int((ks != xs).sum())
        row["fp8_us"] = bench(lambda: fp8_ops.scaled_mm(xq, xs, wq, ws.view(1, -1), torch.bfloat16))

        def with_quant() -> Any:
            xq8, xs8 = quantize_rows(x, fp8_ops.FP8, fp8_ops.FP8_MAX, fp8_ops.MIN_SCALE)
            return fp8_ops.scaled_mm(xq8, xs8, wq, ws.view(1, -1), torch.bfloat16)

        row["fp8_with_act_quant_us"] = bench(with_quant)

    def int8_() -> None:
        w8, s8 = int8.quantize_rows(w_bf16)
        x8, xs8 = int8.quantize_rows(x)
        got = int8.int8_mm(x8, xs8, w8, s8.reshape(-1), torch.bfloat16)
        row["int8_rel_err"] = rel(got, int8.reference_mm(x8, xs8, w8, s8.reshape(-1), torch.float32))
        row["int8_with_act_quant_us"] = bench(
            lambda: int8.int8_mm(*quantize_rows(x, torch.int8, 127.0, 1e-10), w8, s8.reshape(-1), torch.bfloat16)
        )

    def int4() -> None:
        got = int4_matmul(x, qweight, s_t, z_t, 128)
        row["int4_rel_err"] = rel(got, x.float() @ w_int4.float())
        row["int4_us"] = bench(lambda: int4_matmul(x, qweight, s_t, z_t, 128))
        if x.shape[0] >= 256:  # would a dense fallback (dequantize per call, then cuBLAS) beat the kernel here?
            from kvik_quant import int4_pack

            row["int4_torch_dequant_then_bf16_us"] = bench(
                lambda: x @ int4_pack.dequantize_codes(int4_pack.unpack_rows(qweight), s_t, z_t, 128, torch.bfloat16)
            )

    for name, part in (("fp8", fp8), ("int8", int8_), ("int4", int4)):
        try:
            part()
        except Exception as exc:
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def _act_order_check(k: int, n: int, gen: Any) -> float:
    import torch
    from kvik.layers.linear import Linear
    from kvik_quant.int4 import GPTQLinearMethod

    method = GPTQLinearMethod(128)
    layer = Linear(k, n, quant_method=method, dtype=torch.bfloat16, device="cuda")
    values = method.quantize_for_test(torch.randn(n, k, device="cuda", generator=gen) * 0.02)
    values["g_idx"] = values["g_idx"][torch.randperm(k, device="cuda", generator=gen)]
    for key, value in values.items():
        layer.load(key, value.cuda())
    method.process_weights_after_loading(layer)
    assert layer.int4_kernel and layer.perm is not None
    x = torch.randn(8, k, device="cuda", generator=gen).to(torch.bfloat16)
    got = layer(x).float()
    layer.int4_kernel = False
    ref = layer(x).float()
    return float((got - ref).norm() / ref.norm())


# -- part 2: one engine variant (run in a subprocess) -----------------------------------------------------
def variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import kvik
    import torch
    from gpu_common import (
        SHAPES,
        kv_bytes_per_token,
        measure_ceilings,
        sync,
        weight_bytes,
        workload,
        write_random_checkpoint,
    )
    from kvik import SamplingParams

    _ensure_quant_plugin()
    shape = args.shape
    path = write_random_checkpoint(shape, Path(args.root), device=args.device)
    # "<method>_kv": the method with an FP8 KV cache (the "FP8 W8A8 (+ FP8 KV)")
    kv_cache_dtype = "fp8" if name.endswith("_kv") else "auto"
    quantization = None if name == "bf16" else name.removesuffix("_kv").removesuffix("_old_row").removesuffix("_unfused")
    if name.endswith("_unfused"):  # the A/B of kvik_cuda.act_quant: no method states its row quantization
        from kvik.quantization.base import QuantizationMethod
        from kvik_quant.fp8 import Fp8LinearMethod
        from kvik_quant.int8 import Int8LinearMethod

        for cls in (Fp8LinearMethod, Int8LinearMethod):
            cls.input_row_quantization = QuantizationMethod.input_row_quantization  # type: ignore[method-assign]
    if name.endswith("_old_row"):  # the A/B of the one-row W8A16 GEMV: the config it had before run u
        from kvik_quant import w8_kernels

        w8_kernels.ROW_CONFIG = w8_kernels.WIDE_ROW_CONFIG = w8_kernels.W8GemvConfig()
        w8_kernels.W8_GEMV_TABLE.clear()
    t0 = time.perf_counter()
    llm = kvik.LLM(model=str(path), device=args.device, dtype="bfloat16", quantization=quantization,
                   kv_cache_dtype=kv_cache_dtype, max_model_len=2048, max_num_seqs=256,
                   gpu_memory_utilization=0.9)  # fmt: skip
    engine = llm.llm_engine
    out: dict[str, Any] = {
        "variant": name,
        "kv_cache_dtype": kv_cache_dtype,
        "init_s": round(time.perf_counter() - t0, 1),
        "weight_gib": round(engine.runner.weight_bytes() / 2**30, 2),
        "memory_plan": engine.memory_plan.summary(),
        "graphs": len(getattr(engine.runner, "graphs", {})),
    }
    vocab = SHAPES[shape]["vocab_size"]

    def timed(prompt: list[int], new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        sync()
        t = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        sync()
        return time.perf_counter() - t

    timed(workload(1, vocab, 512, 512, seed=99)[0], 16)  # warm-up
    best = min(
        (timed(workload(1, vocab, 512, 512, seed=s + 1)[0], 129) - timed(workload(1, vocab, 512, 512, seed=s)[0], 1)) / 128
        for s in (7, 9)
    )
    bandwidth = measure_ceilings()["copy_bytes_per_s"] if args.device == "cuda" else 1e11
    out["decode_ms_per_token"] = round(best * 1e3, 3)
    out["decode_bandwidth_floor_ms"] = round(
        (engine.runner.weight_bytes() + 768 * kv_bytes_per_token(shape)) / bandwidth * 1e3, 3
    )
    out["copy_tb_s"] = round(bandwidth / 1e12, 2)
    prompts = workload(args.n, vocab)
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(workload(16, vocab, seed=5), SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False),
                 use_tqdm=False)  # fmt: skip
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync()
    wall = time.perf_counter() - t
    prompt_tokens = sum(len(p) for p in prompts)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    flops = 2 * weight_bytes(shape) / 2 * (prompt_tokens + out_tokens)
    out.update(
        offline_n=args.n,
        offline_out_len=args.out_len,
        offline_wall_s=round(wall, 2),
        offline_out_tok_s=round(out_tokens / wall, 1),
        offline_total_tok_s=round((prompt_tokens + out_tokens) / wall, 1),
        mfu_vs_989_bf16=round(flops / wall / 989e12, 4),
        device=torch.cuda.get_device_name() if args.device == "cuda" else args.device,
    )
    return out


def _run_part(part: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """One part in its own process (own GPU memory; a crash or hang costs only that part)."""
    out_file = Path(os.environ.get("OUT", "/tmp")) / f"quant_{part}.json"
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--part", part, "--n", str(args.n), "--out-len", str(args.out_len),
           "--root", args.root, "--shape", args.shape, "--device", args.device]  # fmt: skip
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {limit:.0f} s", "tail": str(exc.stdout or "")[-800:]}
    if out_file.exists():
        result = json.loads(out_file.read_text())
        result["part_wall_s"] = round(time.perf_counter() - t, 1)
        return result
    return {"error": f"exit {proc.returncode}", "tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default=None, help="internal: run one part (kernels, bf16, fp8, int4)")
    ap.add_argument("--parts", default="checkpoint,kernels,bf16,fp8,int4,int8")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--root", default="/tmp/kvik_models")
    ap.add_argument("--shape", default="llama8b", help="a gpu_common.SHAPES name ('tiny' to smoke-test on CPU)")
    ap.add_argument("--device", default="cuda", help="'cpu' only to smoke-test the script (kernels need CUDA)")
    ap.add_argument("--budget-s", type=float, default=470, help="stop starting parts after this many seconds")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.part is not None:  # a child: run, write, exit
        try:
            if args.part == "checkpoint":  # written once, reused by every variant (and by later runs)
                from gpu_common import write_random_checkpoint

                result = {"path": str(write_random_checkpoint(args.shape, Path(args.root), device=args.device))}
            else:
                result = kernels() if args.part == "kernels" else variant(args.part, args)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        (out_dir / f"quant_{args.part}.json").write_text(json.dumps(result, default=str))
        print("RESULT", json.dumps(result, default=str)[:2000], flush=True)
        return
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    limits = {"checkpoint": 150, "kernels": 80, "bf16": 110, "fp8": 100, "int4": 100, "int8": 90, "int8_unfused": 90, "fp8_unfused": 100, "fp8_kv": 100}
    for part in args.parts.split(","):
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            summary[part] = {"error": "skipped: out of time budget"}
            continue
        summary[part] = _run_part(part, args, min(limits.get(part, 170), left))
        print(f"== {part}: {json.dumps(summary[part], default=str)[:1500]}", flush=True)
    base = summary.get("bf16", {})
    for name in [p for p in summary if p not in ("checkpoint", "kernels", "bf16")]:
        r = summary.get(name, {})
        if "offline_out_tok_s" in r and "offline_out_tok_s" in base:
            r["offline_speedup_vs_bf16"] = round(r["offline_out_tok_s"] / base["offline_out_tok_s"], 3)
            r["decode_speedup_vs_bf16"] = round(base["decode_ms_per_token"] / r["decode_ms_per_token"], 3)
    summary["total_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(summary, indent=1, default=str)
    (out_dir / "quant_benchmark.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
