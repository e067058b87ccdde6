"""kvik-example-model: registration, conformance and agreement with its plain-torch reference."""

from __future__ import annotations

import json
from pathlib import Path

import kvik.builtin
import kvik_cpu.plugin
import kvik_example_model.plugin
import pytest
import torch
from kvik.plugins.manager import PluginManager
from kvik.sampling_params import SamplingParams
from kvik.testing.conformance.model import check_model_architecture
from kvik_example_model import ARCHITECTURE
from kvik_example_model.checkpoint import make_tiny_parallel_llama
from kvik_example_model.model import ParallelLlamaForCausalLM
from kvik_example_model.reference import reference_greedy, reference_logits
from safetensors.torch import load_file


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are shared with other test processes
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_parallel_llama(tmp_path_factory.mktemp("parallel_llama"), seed=3)


@pytest.fixture
def manager(kvik_plugin_manager: PluginManager) -> PluginManager:
    """builtin (from the kvik pytest plugin) + kvik-cpu + this plugin, installed as the process-wide manager."""
    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(kvik_example_model.plugin, "example_model", "kvik-example-model")
    return kvik_plugin_manager


def _reference_inputs(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def test_registers_its_architecture(manager: PluginManager) -> None:
    entry = manager.models.entry(ARCHITECTURE)
    assert entry.distribution == "kvik-example-model"
    assert entry.target == "kvik_example_model.model:ParallelLlamaForCausalLM"
    assert "LlamaForCausalLM" in manager.models  # the builtin architectures are untouched


def test_checkpoint_is_a_llama_config_with_our_architecture(checkpoint: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    assert config.architectures == [ARCHITECTURE] and config.model_type == "llama"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template and len(tokenizer) <= config.vocab_size
    weights, _ = _reference_inputs(checkpoint)
    assert not any("post_attention_layernorm" in name for name in weights)  # one norm per parallel block


def test_conformance_against_the_reference(manager: PluginManager, checkpoint: Path) -> None:
    weights, config = _reference_inputs(checkpoint)
    check_model_architecture(checkpoint, manager, reference=lambda ids: reference_logits(weights, config, ids))


def test_conformance_in_bfloat16(manager: PluginManager, tmp_path: Path) -> None:
    # A bf16 checkpoint computed in bf16 (what the cpu platform picks on CPUs with native bf16);
    # the reference computes in float32 from the same bf16 weights, hence the looser tolerance.
    checkpoint = make_tiny_parallel_llama(tmp_path, seed=4, dtype="bfloat16")
    weights, config = _reference_inputs(checkpoint)
    check_model_architecture(
        checkpoint, manager, reference=lambda ids: reference_logits(weights, config, ids), dtype="bfloat16", rtol=3e-2
    )


class _PositionBlind(ParallelLlamaForCausalLM):
    """A subtly wrong port: rotary frequencies zeroed, so attention ignores positions."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.model.rotary_emb.inv_freq.zero_()


def test_conformance_catches_a_wrong_model(checkpoint: Path, monkeypatch) -> None:
    import sys
    import types

    from kvik.plugins.hookspecs import hookimpl

    monkeypatch.setitem(sys.modules, "position_blind", types.SimpleNamespace(Model=_PositionBlind))
    plugin = types.ModuleType("broken_model")
    plugin.KVIK_PLUGIN_API = ">=2.0,<3"
    plugin.kvik_register_models = hookimpl(lambda register: register(ARCHITECTURE, "position_blind:Model"))
    manager = PluginManager(load_entrypoints=False)
    manager.register(kvik.builtin, "builtin", "kvik-core")
    manager.register(plugin, "broken_model")
    weights, config = _reference_inputs(checkpoint)
    with pytest.raises(AssertionError, match="whole prefill vs reference: max"):
        check_model_architecture(checkpoint, manager, reference=lambda ids: reference_logits(weights, config, ids))


def test_engine_greedy_matches_reference(manager: PluginManager, checkpoint: Path) -> None:
    import kvik

    weights, config = _reference_inputs(checkpoint)
    prompts = [[1, 40, 7, 300, 12, 9], [1, 250, 33]]
    llm = kvik.LLM(model=str(checkpoint), device="cpu", block_size=4, num_kv_blocks=32, max_model_len=64)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert llm.llm_engine.model_config.architecture == ARCHITECTURE
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == reference_greedy(weights, config, prompt, 8)
