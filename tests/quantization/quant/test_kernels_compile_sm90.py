"""Every new kvik-quant Triton kernel, in its default configuration, compiles for Hopper (sm_90) on this CPU
machine: Triton's NVIDIA backend and the ptxas bundled with its wheel need no GPU. The interpreter tests
check the arithmetic; this checks what the interpreter does not (lowering, layouts, vector loads, wgmma).

The compiles run in a subprocess (this file as a script) because the test session sets
TRITON_INTERPRET=1, under which ``triton.jit`` makes interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest


def _compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], **options: Any) -> str:
    """PTX of ``fn`` for sm_90, specialized as the JIT would for kvik's tensors (16-byte aligned, sizes % 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: signature.get(n, "constexpr") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n in signature and (signature[n].startswith("*") or n in ("N", "K", "stride_xm"))}  # fmt: skip
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _compile_all() -> dict[str, dict[str, bool]]:
    from kvik_quant.int4_gemv_kernel import (
        ROW_DEFAULT,
        GemvConfig,
        _int4_dequant_kernel,
        _int4_gemv_kernel,
        _int4_gemv_row_kernel,
    )
    from kvik_quant.w8_kernels import (
        ROW_CONFIG,
        W8GemvConfig,
        _int8_gemm_kernel,
        _w8a16_gemv_kernel,
        int8_gemm_config,
    )

    found: dict[str, dict[str, bool]] = {}

    def facts(name: str, ptx: str) -> None:
        found[name] = {"vector_loads": bool(re.search(r"ld\.global[^;]*\.v[24]", ptx)),
                       "atomics": "atom.global" in ptx, "wgmma": "wgmma" in ptx,
                       "pair_dequant": "cvt.f32.f16" in ptx and "lop3.b32" in ptx}  # fmt: skip

    tail = {"out_ptr": "*bf16", "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
            "stride_xm": "i32", "SPLIT_K": "i32"}  # fmt: skip
    g4, g8 = GemvConfig(), W8GemvConfig()
    sig = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", **tail}
    facts("int4_gemv dot", _compile(_int4_gemv_kernel, sig, dict(
        GROUP=128, BLOCK_M=16, BLOCK_N=g4.block_n, BLOCK_K=g4.block_k, IEEE=False), num_warps=g4.num_warps,
        num_stages=g4.num_stages))  # fmt: skip
    r = ROW_DEFAULT
    row_sig = {k: v for k, v in sig.items() if k not in ("M", "stride_xm")}
    for x_kind, x_type, offset in ((0, "*bf16", 1024.0), (1, "*fp16", 1024.0), (2, "*fp32", 0.0)):
        facts(f"int4_gemv row x={x_type}", _compile(_int4_gemv_row_kernel, {**row_sig, "x_ptr": x_type}, dict(
            GROUP=128, BLOCK_N=r.block_n, BLOCK_K=r.block_k, OFFSET=offset, USE_ASM=True, X_KIND=x_kind),
            num_warps=r.num_warps, num_stages=r.num_stages))  # fmt: skip
    for use_dot in (False, True):
        rows = dict(BLOCK_M=16 if use_dot else 1, USE_DOT=use_dot, IEEE=False)
        c8 = g8 if use_dot else ROW_CONFIG  # the default for 2-16 rows, and for one
        for weight in ("*fp8e4nv", "*i8"):
            sig = {"x_ptr": "*bf16", "w_ptr": weight, "ws_ptr": "*fp32", **tail}
            facts(f"w8a16_gemv {weight} dot={use_dot}", _compile(_w8a16_gemv_kernel, sig, dict(
                BLOCK_N=c8.block_n, BLOCK_K=c8.block_k, PREFETCH=c8.prefetch and not use_dot,
                REDUCE_EACH=c8.reduce_each and not use_dot, UNROLL=1 if use_dot else c8.unroll, **rows),
                num_warps=c8.num_warps, num_stages=c8.num_stages))  # fmt: skip
    sig = {"a_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "out_ptr": "*bf16",
           "part_ptr": "*i32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}  # fmt: skip
    configs = {"int8_gemm": int8_gemm_config(4096, 4096), "int8_gemm split": int8_gemm_config(256, 4096, 14336)}
    for name, cfg in configs.items():
        tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
        facts(
            name,
            _compile(
                _int8_gemm_kernel,
                sig,
                dict(**tiles, SPLIT_K=cfg.split_k),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            ),
        )
    sig = {"qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "w_ptr": "*bf16", "N": "i32"}
    facts("int4_dequant", _compile(_int4_dequant_kernel, sig, dict(GROUP=128, BLOCK_R=8, BLOCK_N=128), num_warps=4))
    return found


def test_new_kernels_compile_for_hopper() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(found) == 11
    for name, facts in found.items():
        if name.startswith(("int4_gemv", "w8a16_gemv")):
            assert facts["vector_loads"], name  # 8- or 16-byte weight loads
            assert facts["atomics"], name  # the in-kernel split-K counter
        if name.startswith("int4_gemv row"):
            assert facts["pair_dequant"], name  # two codes per lop3, widened by cvt (the inline PTX)
    assert found["int8_gemm"]["wgmma"]  # Hopper's warpgroup MMA on int8
    assert found["int8_gemm split"]["wgmma"] and found["int8_gemm split"]["atomics"]  # K split: the counter


if __name__ == "__main__":
    print(json.dumps(_compile_all()))


@pytest.mark.parametrize("block_m", [0, 2, 4])  # 0: the one-row kernel
def test_row_gemv_keeps_its_layout(block_m: int) -> None:
    """benchmarks/sass_probe.py on the one-row INT4 GEMV: no shared memory in the loop, no spills, one FFMA per
    weight and activation row (the layout that took it from 29% to 42-57% of its floor; a Triton change that
    spread a step's rows over warps again would show here first). Also the 2- and 4-row kernel, at 64-row
    steps (128 spills at 4 rows)."""
    pytest.importorskip("triton.backends.nvidia")
    from pathlib import Path

    from kvik_quant.int4_gemv_kernel import ROW_DEFAULT

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "sass_probe.py"
    sig = "x_ptr=*bf16,qw_ptr=*i32,s_ptr=*bf16,z_ptr=*bf16,out_ptr=*bf16,part_ptr=*fp32,lock_ptr=*i32,N=i32,K=i32,SPLIT_K=i32"
    block_k = ROW_DEFAULT.block_k if block_m == 0 else 64
    const = f"GROUP=128,BLOCK_N={ROW_DEFAULT.block_n},BLOCK_K={block_k},OFFSET=1024.0,USE_ASM=True,X_KIND=0"
    name = "_int4_gemv_row_kernel"
    if block_m:
        sig += ",M=i32,stride_xm=i32"
        const += f",BLOCK_M={block_m}"
        name = "_int4_gemv_rows_kernel"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run(
        [sys.executable, str(script), f"kvik_quant.int4_gemv_kernel:{name}", "--sig", sig, "--const",
         const, "--warps", str(ROW_DEFAULT.num_warps), "--stages", str(ROW_DEFAULT.num_stages)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout[run.stdout.index("{") :])
    assert facts["stack_bytes"] == 0
    # The rows kernel assembles its rows' results once at the end (a join: a little shared memory).
    assert facts["shared_bytes"] == 0 if block_m == 0 else facts["shared_bytes"] <= 64
    weights_per_step = block_k * 4 * max(1, block_m)  # per thread: BLOCK_K k rows x 4 columns, each row
    assert weights_per_step <= facts["mix"]["FFMA"] < weights_per_step * 1.1
