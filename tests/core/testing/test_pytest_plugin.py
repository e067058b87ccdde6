"""kvik's pytest plugin (loaded through the pytest11 entry point): fixtures and re-exports."""

from __future__ import annotations

import json

from kvik.plugins import manager as manager_mod


def test_kvik_plugin_manager_is_fresh_and_process_wide(kvik_plugin_manager) -> None:
    assert kvik_plugin_manager.plugins() == [("builtin", "kvik-core")]
    assert manager_mod.get_plugin_manager() is kvik_plugin_manager
    assert "torch_ref" in kvik_plugin_manager.attention_backends
    assert kvik_plugin_manager.platforms.names() == []  # nothing installed leaks in


def test_tiny_model_dir_caches_per_arguments(tiny_model_dir) -> None:
    first = tiny_model_dir("qwen2", num_hidden_layers=1)
    assert tiny_model_dir("qwen2", num_hidden_layers=1) == first
    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 1
    other = tiny_model_dir("qwen2", num_hidden_layers=2)
    assert other != first and json.loads((other / "config.json").read_text())["num_hidden_layers"] == 2
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()


def test_conformance_checks_are_re_exported() -> None:
    from kvik.testing import pytest_plugin
    from kvik.testing.conformance.platform import check_platform
    from kvik.testing.conformance.quantization import check_quantization_method

    assert pytest_plugin.check_platform is check_platform
    assert pytest_plugin.check_quantization_method is check_quantization_method
