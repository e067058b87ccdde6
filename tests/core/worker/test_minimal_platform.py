"""A platform written on the runner kit (the docs' example) gives the torch runner's greedy tokens."""

from __future__ import annotations

import sys

from kvik import LLM, SamplingParams
from kvik.testing.reference import random_prompts

from . import minimal_platform


def test_minimal_kit_platform_matches_the_torch_runner(kvik_plugin_manager, tiny_model_dir) -> None:
    import kvik_cpu.plugin

    module = sys.modules[minimal_platform.__name__]
    assert kvik_plugin_manager.register(module, "minimal", "tests")
    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    path = str(tiny_model_dir("llama", num_hidden_layers=2))
    base = random_prompts(5, seed=4, low=2, high=40)
    prompts = [*base, base[2] + [9, 8, 7, 6]]  # a shared prefix (prefix cache), chunked by the small budget
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    options = dict(dtype="float32", block_size=4, num_kv_blocks=160, max_num_seqs=4, max_num_batched_tokens=24)
    expected = LLM(path, device="cpu", **options).generate(prompts, params)  # type: ignore[arg-type]
    got = LLM(path, device="minimal", **options).generate(prompts, params)  # type: ignore[arg-type]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_a_runner_without_batch_invariant_kernels_refuses_deterministic(kvik_plugin_manager, tiny_model_dir) -> None:
    import pytest

    module = sys.modules[minimal_platform.__name__]
    assert kvik_plugin_manager.register(module, "minimal", "tests")
    path = str(tiny_model_dir("llama", num_hidden_layers=2))
    with pytest.raises(ValueError, match="deterministic=True is not supported by the minimal platform's model runner"):
        LLM(path, device="minimal", deterministic=True, dtype="float32", block_size=4, num_kv_blocks=16)
