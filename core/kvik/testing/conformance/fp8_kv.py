"""Conformance check for a backend's FP8 KV cache (``kv_cache_dtype="fp8"``).

Use in a backend plugin's tests (the backend lists ``"fp8_e4m3"`` in
``supported_kv_cache_dtypes``)::

    from kvik.testing.conformance.fp8_kv import check_fp8_kv_cache

    def test_fp8_cache():
        check_fp8_kv_cache(MyBackend, device="cuda", dtype=torch.bfloat16)

Two steps (prefill, then a mixed batch of decodes, chunks over cached prefixes and
fresh prompts) run through the backend on a float8_e4m3fn cache with non-trivial
``k_scale`` / ``v_scale``. Checked each step:

- the write: every written cache entry equals the reference quantization
  (:func:`kvik.attention.fp8_kv.quantize`: ``x / scale``, saturated, rounded to nearest even);
- the read: the output equals the torch reference attending in float32 over the
  dequantized values (``fp8 * scale``), within the dtype's tolerance.

Inputs span magnitudes from e4m3's subnormals to past its saturation point.
"""

from __future__ import annotations

import random

import torch

from kvik.attention import fp8_kv
from kvik.attention.backend import AttentionBackend
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.testing.conformance.attention import TOLERANCES, _requests, build_metadata


def _spread(n: int, heads: int, head_size: int, gen: torch.Generator) -> torch.Tensor:
    """float32 values of every magnitude an fp8 cache meets: 2^-10 .. 2^7 (x a scale of ~1), some saturating."""
    x = torch.randn(n, heads, head_size, generator=gen)
    return x * torch.exp2(torch.empty(n, heads, head_size).uniform_(-10.0, 7.0, generator=gen))


def check_fp8_kv_cache(
    backend_cls: type[AttentionBackend[torch.Tensor]],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    head_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    block_size: int = 16,
    k_scale: float = 0.25,
    v_scale: float = 1.5,
    window: int | None = None,
    seed: int = 0,
) -> None:
    """Raise ``AssertionError`` naming the step and what differs (see the module docstring)."""
    device = torch.device(device)
    assert "fp8_e4m3" in backend_cls.supported_kv_cache_dtypes, f"{backend_cls.__name__} lists no FP8 cache"
    atol, rtol = TOLERANCES.get(dtype, (2.5e-2, 2.5e-2))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    reqs, num_blocks = _requests(rng, block_size, window)
    scale = head_size**-0.5
    backend = backend_cls(num_heads, head_size, num_kv_heads, scale, window)
    backend.set_kv_scale("k", k_scale)
    backend.set_kv_scale("v", v_scale)
    ref = TorchRefAttentionBackend(num_heads, head_size, num_kv_heads, scale, window)
    shape = backend_cls.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)
    cache = torch.zeros(shape, dtype=fp8_kv.FP8_DTYPE, device=device)
    ref_cache = torch.zeros(TorchRefAttentionBackend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size))
    ref_cache = ref_cache.to(device)
    steps = [
        [(r.cached, r.cached, r.blocks) for r in reqs if r.cached > 0],
        [(r.new, r.cached + r.new, r.blocks) for r in reqs],
    ]
    for step, rows in enumerate(steps, start=1):
        q_lens, s_lens = [q for q, _, _ in rows], [s for _, s, _ in rows]
        tables = [b[: -(-s // block_size)] for _, s, b in rows]
        n = sum(q_lens)
        q = torch.randn(n, num_heads, head_size, generator=gen).to(device=device, dtype=dtype)
        k = _spread(n, num_kv_heads, head_size, gen).to(device=device, dtype=dtype)
        v = _spread(n, num_kv_heads, head_size, gen).to(device=device, dtype=dtype)
        k8, v8 = fp8_kv.quantize(k, k_scale), fp8_kv.quantize(v, v_scale)
        metadata = build_metadata(q_lens, s_lens, tables, block_size, device)
        backend_cls.prepare(metadata)
        out = backend.forward(q, k, v, cache, metadata)
        # The write: the entries at this step's slots are exactly the reference quantization.
        slots = metadata.slot_mapping
        for name, got8, want in zip("KV", backend_cls.cache_entries(cache, slots), (k8, v8), strict=True):
            got = got8.float()
            wrong = (got != want.float()).sum().item()
            assert wrong == 0, f"step {step}: {wrong} of {want.numel()} {name} cache entries differ from x / scale in e4m3"
        # The read: attention over the dequantized values, in float32.
        ref_meta = build_metadata(q_lens, s_lens, tables, block_size, device)
        TorchRefAttentionBackend.prepare(ref_meta)
        kd = fp8_kv.dequantize(k8, k_scale, torch.float32)
        vd = fp8_kv.dequantize(v8, v_scale, torch.float32)
        expected = ref.forward(q.float(), kd, vd, ref_cache, ref_meta)
        err = (out.float() - expected).abs().max().item()
        # Outputs are convex combinations of V rows: absolute rounding error scales with the largest |V|.
        step_atol = atol * max(1.0, vd.abs().max().item())
        assert torch.allclose(out.float(), expected, atol=step_atol, rtol=rtol), (
            f"step {step}: {backend_cls.__name__} on an FP8 cache differs from attention over the dequantized "
            f"cache by up to {err:.3g} (atol {step_atol:.3g}, rtol {rtol})"
        )
