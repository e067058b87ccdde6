"""The tiled LoRA kernels (SGMV shrink/expand, fused) and the tile-map kernel compile for Hopper (sm_90) on this CPU machine.

The interpreter tests check the arithmetic; this checks what the interpreter does not: that the
grid-stride loop over the tile map (bounds read from device memory) lowers, and that the tiles'
``tl.dot`` become tensor-core MMAs. Triton's NVIDIA backend and its bundled ptxas need no GPU.
The compiles run in a subprocess (this file as a script): the test session sets TRITON_INTERPRET=1,
under which ``triton.jit`` functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

INTS = ("num_tokens", "num_programs", "in_features", "out_features", "num_cols", "k_per_split", "rank", "start1", "start2",
        "split_k", "splits", "stride_xt", "stride_al", "stride_ar", "stride_ss", "stride_st", "stride_bl", "stride_bo",
        "stride_yt", "stride_tiles")  # fmt: skip


def _ptx(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], **options: Any) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: pointers.get(n, "i32" if n in INTS else "constexpr") for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers}  # as torch allocates
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _compile_all() -> dict[str, bool]:
    from kvik_cuda.lora_fused import _fused_kernel
    from kvik_cuda.lora_kernels import LoRAKernelConfig
    from kvik_cuda.lora_sgmv import _sgmv_expand_kernel, _sgmv_shrink_kernel
    from kvik_cuda.lora_tiles import _tile_map_kernel

    cfg = LoRAKernelConfig(block_m=64, block_k=64, block_n=128, num_stages=3, expand_precision="tf32x3")
    tiles = {"tiles_ptr": "*i32", "count_ptr": "*i32"}
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptx = {
        "shrink": _ptx(_sgmv_shrink_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "s_ptr": "*fp32", "lock_ptr": "*i32",
                                             **tiles},
                       dict(BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k, PRECISION="ieee",
                            UPCAST=False), **opts),
        "expand": _ptx(_sgmv_expand_kernel, {"s_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", **tiles},
                       dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=16,
                            PRECISION=cfg.expand_precision),
                       **opts),
        "fused": _ptx(_fused_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", **tiles},
                      dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, BLOCK_R=16, PRECISION="ieee", UPCAST=False), **opts),
    }  # fmt: skip
    found = {name: "mma" in text for name, text in ptx.items()}
    _ptx(_tile_map_kernel, {"slots_ptr": "*i64", "tiles_ptr": "*i32", "count_ptr": "*i32"},
         dict(BLOCK_M=cfg.block_m, CHUNK=1024), num_warps=4)  # fmt: skip
    return found | {"tile_map": True}


def test_tiled_lora_kernels_compile_for_hopper() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"shrink": True, "expand": True, "fused": True, "tile_map": True}


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
