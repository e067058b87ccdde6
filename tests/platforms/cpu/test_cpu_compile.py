"""compile_decode (kvik_cpu.runner): decode steps through torch.compile give the eager tokens."""

from __future__ import annotations

import kvik_cpu.plugin
import pytest
import torch
from kvik.sampling_params import SamplingParams
from kvik.testing.reference import random_prompts
from kvik_cpu.runner import CPUModelRunner


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _generate(path, prompts, compile_decode: bool) -> tuple[list[list[int]], CPUModelRunner]:
    import kvik

    llm = kvik.LLM(
        model=str(path),
        device="cpu",
        num_threads=1,
        max_model_len=128,
        num_kv_blocks=64,
        platform_options={"compile_decode": compile_decode},
    )
    runner = llm.llm_engine.runner
    assert isinstance(runner, CPUModelRunner)
    calls = []
    original = runner.uses_compiled
    runner.uses_compiled = lambda inputs: calls.append(original(inputs)) or calls[-1]  # type: ignore[method-assign]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    # Prefill steps ran eagerly; decode steps compiled exactly when the option is on.
    assert (True in calls) == compile_decode and False in calls
    return [o.outputs[0].token_ids for o in outputs], runner


def test_compiled_decode_matches_eager(kvik_plugin_manager, tiny_model_dir) -> None:
    kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    path = tiny_model_dir("llama")
    # Two requests of different lengths: decode steps at batch 2 and, once the short one ends, batch 1.
    prompts = random_prompts(2, seed=11, high=24)
    eager, _ = _generate(path, prompts, False)
    compiled, runner = _generate(path, prompts, True)
    assert compiled == eager
    assert runner.compile_seconds > 0  # the batch-1 step was compiled at start-up


def test_compile_decode_must_be_a_bool(kvik_plugin_manager, tiny_model_dir) -> None:
    import kvik

    kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    with pytest.raises(ValueError, match="compile_decode must be True or False, got 'yes'"):
        kvik.LLM(model=str(tiny_model_dir("llama")), device="cpu", platform_options={"compile_decode": "yes"})


def test_compile_decode_is_off_in_deterministic_mode(kvik_plugin_manager, tiny_model_dir) -> None:
    import kvik

    kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    llm = kvik.LLM(
        model=str(tiny_model_dir("llama")),
        device="cpu",
        num_threads=1,
        max_model_len=64,
        num_kv_blocks=16,
        deterministic=True,
        platform_options={"compile_decode": True},
    )
    runner = llm.llm_engine.runner
    assert isinstance(runner, CPUModelRunner)
    assert not runner.compile_decode and runner._compiled is None and runner.compile_seconds == 0.0
