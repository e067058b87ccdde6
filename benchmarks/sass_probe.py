"""Compile a Triton kernel for Hopper (sm_90) on any machine and print what the GPU would run: registers,
spills, shared memory, layout conversions and the SASS instruction mix. No GPU needed (Triton's NVIDIA
backend and the ptxas / nvdisasm / cuobjdump bundled with its wheel do it all on the CPU).

    python3 benchmarks/sass_probe.py kvik_quant.int4_gemv_kernel:_int4_gemv_row_kernel \\
        --sig x_ptr=*bf16,qw_ptr=*i32,s_ptr=*bf16,z_ptr=*bf16,out_ptr=*bf16,part_ptr=*fp32,lock_ptr=*i32,N=i32,K=i32,SPLIT_K=i32 \\
        --const GROUP=128,BLOCK_N=128,BLOCK_K=128,OFFSET=1024.0,USE_ASM=True,X_KIND=0 --warps 1 --stages 1

This is how the one-row INT4 GEMV's layout problem was found (docs/benchmarks.md, run h): instructions per
weight and layout conversions are visible before any device time is spent. Integer arguments named in
``--aligned`` (default: pointers and N, K, stride_*) are specialised as divisible by 16, as the JIT does for
kvik's tensors. ``--dump DIR`` writes the ttgir, PTX and SASS there.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def probe(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], warps: int, stages: int,
          aligned: set[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90 and summarise it."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: signature.get(n, "constexpr") for n in names}
    wanted = aligned if aligned is not None else {n for n in signature if n in ("N", "K") or n.startswith("stride")}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in signature and (signature[n].startswith("*") or n in wanted)}  # fmt: skip
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    tools = Path(importlib.import_module("triton.backends.nvidia").__file__).parent / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass))
    ttgir = kernel.asm["ttgir"]
    return {
        "registers": int(m.group(1)) if (m := re.search(r"REG:(\d+)", usage)) else None,
        "stack_bytes": int(m.group(1)) if (m := re.search(r"STACK:(\d+)", usage)) else None,
        "shared_bytes": kernel.metadata.shared,
        "layout_conversions": ttgir.count("ttg.convert_layout"),
        "layouts": [line.split(" = ", 1)[1][:160] for line in ttgir.splitlines() if line.startswith("#blocked")],
        "instructions": sum(ops.values()),
        "mix": dict(ops.most_common(20)),
        "_asm": {"ttgir": ttgir, "ptx": kernel.asm["ptx"], "sass": sass},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", help="module:function, e.g. kvik_quant.int4_gemv_kernel:_int4_gemv_row_kernel")
    ap.add_argument("--sig", required=True, help="name=type,... for runtime arguments (*bf16, *i32, i32, fp32 ...)")
    ap.add_argument("--const", default="", help="name=value,... for constexpr arguments")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--aligned", help="integer arguments specialised as multiples of 16 (default: N, K, stride_*)")
    ap.add_argument("--dump", type=Path, help="write kernel.ttgir / .ptx / .sass into this folder")
    args = ap.parse_args()
    module, name = args.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    aligned = set(args.aligned.split(",")) if args.aligned else None
    consts = {k: _value(v) for k, v in _pairs(args.const).items()}
    result = probe(fn, _pairs(args.sig), consts, args.warps, args.stages, aligned)
    asm = result.pop("_asm")
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for ext, text in asm.items():
            (args.dump / f"kernel.{ext}").write_text(text)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
