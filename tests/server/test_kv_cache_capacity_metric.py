"""/metrics reports the KV cache's capacity in tokens and what it stores: an FP8 cache holds twice a bf16 one's."""

from __future__ import annotations

import re
from pathlib import Path

from server_harness import InProcessServer

BUDGET = 256 << 10  # bytes for KV blocks: the same memory for both servers


def _capacity(model: Path, **engine_kwargs: object) -> tuple[str, float]:
    server = InProcessServer(model, dtype="bfloat16", kv_cache_memory=BUDGET, **engine_kwargs)
    try:
        text = server.get("/metrics").text
    finally:
        server.close()
    match = re.search(r'^kvik:kv_cache_capacity_tokens\{cache_dtype="([^"]+)",model_name="tiny"\} (\S+)$', text, re.M)
    assert match, text
    return match.group(1), float(match.group(2))


def test_kv_cache_capacity_metric_doubles_with_an_fp8_cache(tiny_model: Path) -> None:
    bf16_dtype, bf16_tokens = _capacity(tiny_model)
    fp8_dtype, fp8_tokens = _capacity(tiny_model, kv_cache_dtype="fp8")
    assert (bf16_dtype, fp8_dtype) == ("bfloat16", "fp8_e4m3")
    assert bf16_tokens > 0 and fp8_tokens == 2 * bf16_tokens
