"""Draft models and EAGLE heads through the CUDA platform's runner (run on the CPU here).

The draft runner is a second CUDAModelRunner: its draft steps go through the pinned
step-input buffers; the target's final hidden states feed the EAGLE head from the
same path. Greedy output must equal the CUDA runner's own output without speculation.
On a GPU (``-m gpu``) the same runs with CUDA graphs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import host_cuda_platform
import pytest
import torch
from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts
from kvik_cuda.runner import CUDAModelRunner

_spec = importlib.util.spec_from_file_location(
    "kvik_eagle_heads", Path(__file__).parents[2] / "core" / "spec_decode" / "test_eagle.py"
)
heads = importlib.util.module_from_spec(_spec)  # the EAGLE head writer of the core tests
_spec.loader.exec_module(heads)  # type: ignore[union-attr]

CUDA = torch.cuda.is_available()


def _run(target: Path, device: str, spec: dict | None) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(target), device=device, dtype="float32", block_size=16, max_model_len=96, max_num_seqs=8,
              max_num_batched_tokens=40, num_kv_blocks=64, speculative_config=spec)  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, seed=4, low=5, high=50)]
    out = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out], llm


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_drafters_on_the_cuda_runner_keep_greedy_output(kvik_plugin_manager, tiny_model_dir, tmp_path, method) -> None:
    import kvik_cuda.plugin

    assert kvik_plugin_manager.register(host_cuda_platform, "host-cuda", "tests")
    device = "cuda" if CUDA else "host-cuda"
    if CUDA:
        assert kvik_plugin_manager.register(kvik_cuda.plugin, "cuda", "kvik-cuda")
    target = tiny_model_dir("llama")
    model = str(target) if method == "draft_model" else str(heads.write_head(tmp_path / "head", "eagle"))
    want, _ = _run(target, device, None)
    got, llm = _run(target, device, {"method": method, "model": model, "num_speculative_tokens": 3})
    assert got == want
    runner = llm.llm_engine.runner
    assert isinstance(runner, CUDAModelRunner) and runner.drafter is not None
    stats = llm.llm_engine.get_stats()
    assert stats.spec_draft_tokens > 0
    assert not runner.drafter.needs_eager_target
    assert runner.verify_tokens_per_request == 4  # verify shapes of k + 1 tokens per request, either drafter
    if method == "draft_model":  # the target as its own draft: everything accepted
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert isinstance(runner.drafter.draft, CUDAModelRunner)  # type: ignore[attr-defined]
