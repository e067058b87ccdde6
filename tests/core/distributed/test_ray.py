"""The Ray executor on a local Ray cluster (``ray.init()`` in-process, two CPU actors): the same Worker
code as the multiprocess executor, so the same greedy tokens as one device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvik import LLM, SamplingParams

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'kvik-core[ray]')")

PROMPTS = ["Hello world", "The quick brown fox jumps", "def main():"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_tensor_parallel_matches_one_device(local_ray: None, tiny_model_dir: Any) -> None:
    model: Path = tiny_model_dir("llama")
    kwargs = dict(model=str(model), device="cpu", dtype="float32", num_kv_blocks=64, num_threads=1)
    one = LLM(**kwargs)
    want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
    one.llm_engine.shutdown()
    llm = LLM(**kwargs, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert type(llm.llm_engine.executor).__name__ == "RayExecutor"
    finally:
        llm.llm_engine.shutdown()
    assert got == want
    assert ray.util.placement_group_table() == {} or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values()
    )
