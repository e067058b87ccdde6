"""One-off A/B: the FP8-cache decode with the old kernel (bf16 dots, e4m3 -> f16 -> bf16) against the new
(fp16 dots), over tiles, same process; bf16 cache default tile as the reference point."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".ab")
import old_attn_kernels  # noqa: E402
import f16_attn_kernels  # noqa: E402
import kvik_triton_attention.backend as B  # noqa: E402
import kvik_triton_attention.kernels as new_kernels  # noqa: E402
from triton_attention import D, KVH, H, bench, make, rel_err, variant  # noqa: E402
from kvik.attention.torch_ref import TorchRefAttentionBackend  # noqa: E402
from kvik.attention import fp8_kv  # noqa: E402

out_dir = Path(os.environ.get("OUT", "/tmp"))
rows = []
tiles = {"n128s3": ((16, 128, 4), 3), "n128s2": ((16, 128, 4), 2), "n64s2": ((16, 64, 4), 2),
         "n64s3": ((16, 64, 4), 3), "n64w2s3": ((16, 64, 2), 3), "n32s3": ((16, 32, 4), 3)}
for batch, ctx in [(256, 830), (128, 830), (256, 2048), (32, 1024)]:
    query, cache16, meta = make([(ctx - 1, 1)] * batch)
    cache8 = (cache16 * 0.5).to(torch.float8_e4m3fn)  # stored at scale 2 for both K and V
    # the same values with each block's V stored [kv_heads, head_size, block_size] (keys contiguous)
    cache8_t = cache8.clone()
    cache8_t[1] = cache8[1].permute(0, 2, 3, 1).contiguous().view(cache8[1].shape)
    # reference: float32 attention over the dequantized cache
    ref = TorchRefAttentionBackend(H, D, KVH, D**-0.5)
    deq = fp8_kv.dequantize(cache8, 2.0, torch.float32)
    TorchRefAttentionBackend.prepare(meta)
    slots = meta.slot_mapping
    k_now = deq[0].view(-1, KVH, D)[slots].clone()
    v_now = deq[1].view(-1, KVH, D)[slots].clone()
    expected = ref.forward(query.float(), k_now, v_now, deq.clone(), meta)
    meta.backend_data.clear()
    kv8 = batch * ctx * KVH * D * 2
    row = {"batch": batch, "ctx": ctx}
    base = TritonAttentionBackend = B.TritonAttentionBackend
    b16 = base(H, D, KVH, D**-0.5)
    o16 = torch.empty_like(query)
    b16.attend(query, cache16, meta, o16)
    row["bf16_cache_default"] = round(bench(lambda: b16.attend(query, cache16, meta, o16)) * 1e3, 1)
    versions = (("old", old_attn_kernels, cache8), ("f16", f16_attn_kernels, cache8), ("vt", new_kernels, cache8_t),
                ("old2", old_attn_kernels, cache8), ("f162", f16_attn_kernels, cache8), ("vt2", new_kernels, cache8_t))
    for version, mod, cache in versions:
        B._kernels = lambda mod=mod: mod
        for name, (tile, stages) in tiles.items():
            cls = variant(name, fp8_decode_tile=tile, fp8_decode_stages=stages)
            be = cls(H, D, KVH, D**-0.5)
            be.set_kv_scale("k", 2.0)
            be.set_kv_scale("v", 2.0)
            out = torch.empty_like(query)
            meta.backend_data.clear()
            try:
                be.attend(query, cache, meta, out)
                ms = bench(lambda: be.attend(query, cache, meta, out))
            except Exception as exc:
                row[f"{version}_{name}"] = f"error {type(exc).__name__}: {str(exc)[:150]}"
                continue
            row[f"{version}_{name}"] = {"us": round(ms * 1e3, 1), "TB/s": round(kv8 / ms / 1e9, 2),
                                        "err": f"{rel_err(out, expected):.2e}"}
    print(json.dumps(row), flush=True)
    rows.append(row)
    del cache16, cache8, cache8_t, deq
(out_dir / "fp8_attn_ab.json").write_text(json.dumps(rows, indent=1))
