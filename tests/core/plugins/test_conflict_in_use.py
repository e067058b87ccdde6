"""docs/plugins.md's promises about conflicts, versions and test checkpoints hold."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
from kvik.config import EngineConfig
from kvik.models.model_config import build_model_config, resolve_format
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.registry import PluginError
from kvik.testing.tiny_models import write_checkpoint
from kvik.version import PLUGIN_API_VERSION

DOCS = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"


def _plugin(name: str, arch: str, target: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]

    @hookimpl
    def kvik_register_models(register):
        register(arch, target)

    module.kvik_register_models = kvik_register_models  # type: ignore[attr-defined]
    return module


def test_an_architecture_two_plugins_register_is_an_error_naming_both(kvik_plugin_manager, tiny_model_dir):
    kvik_plugin_manager.register(_plugin("rival", "LlamaForCausalLM", "rival_llama:Llama"), "rival", "kvik-rival")
    path = str(tiny_model_dir("llama"))
    with pytest.raises(PluginError) as info:
        build_model_config(EngineConfig(model=path), resolve_format(path, kvik_plugin_manager), kvik_plugin_manager)
    message = str(info.value)
    assert "kvik-rival" in message and "kvik.models.llama" in message and "more than one plugin" in message
    assert "is not supported" not in message


def test_the_documented_refusal_message_shows_the_current_api_version():
    text = DOCS.read_text()
    versions = re.findall(r"but this kvik provides (\d+\.\d+)", text)
    assert versions and set(versions) == {PLUGIN_API_VERSION}


def test_write_checkpoint_makes_a_loadable_checkpoint_for_a_new_architecture(tmp_path, kvik_plugin_manager):
    kvik_plugin_manager.register(_plugin("mine", "MyLlamaForCausalLM", "kvik.models.llama:LlamaForCausalLM"), "mine")
    config = dict(architectures=["MyLlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=128, rms_norm_eps=1e-5, eos_token_id=2, torch_dtype="float32")  # fmt: skip
    weights = {
        "model.embed_tokens.weight": torch.randn(512, 32),
        "model.norm.weight": torch.ones(32),
        "lm_head.weight": torch.randn(512, 32),
    }
    path = write_checkpoint(tmp_path / "tiny", config, weights)
    model_config = build_model_config(EngineConfig(model=str(path)), resolve_format(str(path)), kvik_plugin_manager)
    assert model_config.architecture == "MyLlamaForCausalLM" and model_config.max_model_len == 128
    assert "write_checkpoint(" in DOCS.read_text()
