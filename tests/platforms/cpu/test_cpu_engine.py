"""kvik.LLM on the cpu platform (kvik-cpu + the core) against Hugging Face transformers."""

from __future__ import annotations

import kvik_cpu.plugin
import pytest
import torch
from kvik.sampling_params import SamplingParams
from kvik.testing.reference import hf_greedy, random_prompts
from kvik.worker.torch_runner import TorchModelRunner
from kvik_cpu.platform import CPUPlatform


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_llm_on_cpu_matches_hf_greedy(kvik_plugin_manager, tiny_model_dir) -> None:
    import kvik

    kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    path = tiny_model_dir("llama")
    prompts = random_prompts(3, seed=5, high=24)
    llm = kvik.LLM(model=str(path), device="cpu", num_threads=1, max_model_len=128, num_kv_blocks=64)
    engine = llm.llm_engine
    assert isinstance(engine.platform, CPUPlatform)
    assert isinstance(engine.runner, TorchModelRunner) and engine.runner.device == torch.device("cpu")
    assert torch.get_num_threads() == 1  # configure() applied num_threads
    assert (engine.config.block_size, engine.config.max_num_seqs) == (16, 32)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    expected = hf_greedy(path, prompts, 10)
    assert [o.outputs[0].token_ids for o in outputs] == expected
