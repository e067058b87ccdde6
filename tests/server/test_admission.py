"""--max-waiting-requests under a burst: admissions are counted at the door (issue 18, fuzz defect 6)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from kvik_server.admission import AdmissionLedger, KVCapacity
from kvik_server.context import ServerSettings
from server_harness import InProcessServer


def test_ledger_fills_seats_then_waits_fcfs() -> None:
    ledger = AdmissionLedger(max_num_seqs=2, kv=None)
    assert ledger.num_waiting([(10, 1)]) == 0
    for i in range(5):
        ledger.add(f"r{i}", 10, 1)
    assert ledger.num_waiting() == 3
    assert ledger.num_waiting([(10, 3)]) == 6
    ledger.remove("r0")
    ledger.remove("unknown")  # idempotent
    assert ledger.num_waiting() == 2 and len(ledger) == 4
    assert AdmissionLedger(max_num_seqs=4, kv=None).num_waiting([(10, 6)]) == 2  # n larger than the batch


def test_ledger_counts_kv_blocks() -> None:
    kv = KVCapacity(num_blocks=10, block_size=16)
    assert kv.blocks_for(40, 1) == 3 and kv.blocks_for(40, 4) == 6  # 2 shared full blocks + 1 each
    assert KVCapacity(10, 16, prefix_caching=False).blocks_for(40, 4) == 12
    ledger = AdmissionLedger(max_num_seqs=32, kv=kv)
    for i in range(5):
        ledger.add(f"r{i}", 40, 1)
    assert ledger.num_waiting() == 2  # three 3-block prompts fit 10 blocks; the KV cache, not the seats, binds
    # FCFS: a small request behind a waiting one waits too, as in the scheduler
    assert ledger.num_waiting([(1, 1)]) == 3


def test_burst_against_a_limit_of_4(tiny_model: Path) -> None:
    """32 simultaneous requests; the KV cache holds 4 sequences and 4 may wait: 8 are served, 24 get 503."""
    block_size, prompt_len, max_tokens = 16, 20, 4  # 24 tokens: 2 blocks a sequence
    server = InProcessServer(
        tiny_model,
        ServerSettings(served_model_name="tiny", max_waiting_requests=4),
        max_num_seqs=32,
        block_size=block_size,
        num_kv_blocks=1 + 4 * 2,  # one null block + room for 4 sequences
        max_model_len=4 * 2 * block_size,  # a sequence may fill the whole cache
    )
    body = {"prompt": list(range(5, 5 + prompt_len)), "max_tokens": max_tokens, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        return list(await asyncio.gather(*(server.client.post("/v1/completions", json=body) for _ in range(32))))

    try:
        responses = server.run(burst(), timeout=120)
        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(served) == 8, [r.status_code for r in responses]
        for r in served:
            assert r.json()["usage"]["completion_tokens"] == max_tokens
        for r in refused:
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "server_overloaded"
        ctx = server.app.state.ctx
        assert len(ctx.admission) == 0 and not ctx.inflight  # every admission was released
        again = server.run(burst(), timeout=120)
        assert sum(r.status_code == 200 for r in again) == 8
    finally:
        server.close()
