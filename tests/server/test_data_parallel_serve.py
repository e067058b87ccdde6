"""``kvik serve --data-parallel-size 2``: two replicas behind the app; requests are answered, both replicas
work, /metrics counts the whole server, and the flags reach the router."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvik.engine.data_parallel import DataParallelLLM
from kvik_server.cli import parse_serve_args
from kvik_server.context import ServerSettings
from server_harness import InProcessServer


def test_two_replicas_serve_and_merge_metrics(tiny_model: Path) -> None:
    router = DataParallelLLM.from_engine_args(2, "least_loaded", model=str(tiny_model), device="cpu",
                                              max_model_len=256, max_num_seqs=8, num_threads=1)  # fmt: skip
    server = InProcessServer(tiny_model, ServerSettings(served_model_name="tiny"), engine=router)
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda i: server.post("/v1/completions", {**body, "seed": i}), range(6)))
        assert all(r.status_code == 200 for r in responses)
        assert len({r.json()["choices"][0]["text"] for r in responses}) == 1  # greedy: one answer everywhere
        assert all(r.engine.get_stats().generation_tokens_total > 0 for r in router.replicas)
        metrics = server.get("/metrics").text
        total = re.search(r"^kvik:generation_tokens_total(?:\{[^}]*\})? (\S+)", metrics, re.MULTILINE)
        assert total is not None and float(total.group(1)) == 36
        assert server.get("/ready").status_code == 200
    finally:
        server.close()


def test_serve_flags_for_data_parallelism() -> None:
    args = parse_serve_args(["--model", "m", "-dp", "2", "--data-parallel-routing", "prefix", "-tp", "2"])
    assert (args.data_parallel_size, args.data_parallel_routing, args.tensor_parallel_size) == (2, "prefix", 2)
