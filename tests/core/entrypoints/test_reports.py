"""``kvik plugins`` and ``kvik env`` reports, built from a fresh plugin manager."""

from __future__ import annotations

import sys
import types

import kvik.builtin
import kvik_cpu.plugin
import pytest
import torch
from kvik.entrypoints.reports import env_report, plugins_report
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginFailure, PluginManager
from kvik.version import PLUGIN_API_VERSION, __version__


class Phantom(Platform):
    name = "phantom"
    device_type = "phantom"
    priority = 5

    @classmethod
    def is_available(cls) -> bool:
        return False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "no phantom device attached"

    def memory_info(self) -> MemoryInfo:  # pragma: no cover - never available
        raise NotImplementedError

    def create_model_runner(self, config, model_config):  # pragma: no cover
        raise NotImplementedError


def _plugin(name: str, api: str = ">=2.0,<3", **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    module.KVIK_PLUGIN_API = api
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


@pytest.fixture
def manager(monkeypatch) -> PluginManager:
    monkeypatch.delenv("KVIK_DEVICE", raising=False)
    monkeypatch.setitem(sys.modules, "phantom_platform", types.SimpleNamespace(Phantom=Phantom))
    manager = PluginManager(load_entrypoints=False)
    manager.register(kvik.builtin, "builtin", "kvik-core")
    manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    manager.register(
        _plugin(
            "phantom",
            kvik_register_platforms=lambda register: register("phantom", "phantom_platform:Phantom"),
            kvik_register_models=lambda register: register("LlamaForCausalLM", "phantom_models:Llama"),
        ),
        "phantom",
        "kvik-phantom",
    )
    manager.register(_plugin("future", api=">=3"), "future", "kvik-future")
    return manager


def test_plugins_report(manager: PluginManager) -> None:
    report = plugins_report(manager)
    lines = report.splitlines()
    assert lines[0] == f"kvik {__version__}, plugin API {PLUGIN_API_VERSION}"

    def row(*cells: str) -> None:
        assert any(all(c in line for c in cells) for line in lines), f"no row with {cells} in:\n{report}"

    row("builtin", "kvik-core")
    row("cpu", "kvik-cpu", "kvik_cpu.platform:CPUPlatform", "0", "yes")
    row("phantom", "kvik-phantom", "phantom_platform:Phantom", "5", "no: no phantom device attached")
    row("torch_ref", "kvik-core", "kvik.attention.torch_ref:TorchRefAttentionBackend")
    row("Qwen2ForCausalLM", "kvik-core", "kvik.models.llama:Qwen2ForCausalLM")
    row("safetensors", "kvik-core")
    assert "Quantization methods:\n  (none registered)" in report
    # the refused plugin and the conflict, with both sides named
    row("future", "kvik-future", ">=3", PLUGIN_API_VERSION)
    row("model architecture", "LlamaForCausalLM", "kvik-core (kvik.models.llama:LlamaForCausalLM)", "kvik-phantom")
    model_section = report.split("Model architectures:")[1].split("Model formats:")[0]
    assert "LlamaForCausalLM" not in model_section  # a conflicted name is not listed as usable


def test_plugins_report_shows_broken_platforms_and_skips(manager: PluginManager) -> None:
    manager.register(
        _plugin("ghost", kvik_register_platforms=lambda register: register("ghost", "kvik_no_such_mod:Ghost")),
        "ghost",
        "kvik-ghost",
    )
    manager.skipped.append(PluginFailure("blocked", "kvik-blocked", "listed in KVIK_DISABLE_PLUGINS"))
    report = plugins_report(manager)
    assert "broken: PluginError: could not import kvik_no_such_mod:Ghost" in report
    assert "Skipped plugins:" in report and "listed in KVIK_DISABLE_PLUGINS" in report


def test_plugins_report_summarises_tracebacks() -> None:
    manager = PluginManager(load_entrypoints=False)

    def kvik_register_models(register):
        raise RuntimeError("registration exploded")

    manager.register(_plugin("boom", kvik_register_models=kvik_register_models), "boom", "kvik-boom")
    failed = plugins_report(manager).split("Failed plugins")[1]
    assert "RuntimeError: registration exploded" in failed and "Traceback" not in failed


def test_env_report(manager: PluginManager) -> None:
    report = env_report(manager)
    assert f"kvik: {__version__} (plugin API {PLUGIN_API_VERSION})" in report
    assert f"torch: {torch.__version__}" in report
    assert f"python: {sys.version.split()[0]}" in report
    assert "selected for device=None: cpu (highest priority available)" in report
    assert "no: no phantom device attached" in report
    cpu_section = report.split("Platform cpu:")[1]
    assert "torch cpu capability" in cpu_section and "native bf16" in cpu_section
    assert "kvik-core" in report.split("Installed kvik distributions:")[1]
    if not torch.cuda.is_available():
        assert "CUDA / ROCm (torch):\n  not available" in report


def test_env_report_names_a_forced_device(manager: PluginManager, monkeypatch) -> None:
    monkeypatch.setenv("KVIK_DEVICE", "phantom")
    assert "selected for device=None: none (platform 'phantom'" in env_report(manager)
    monkeypatch.setenv("KVIK_DEVICE", "cpu")
    assert "selected for device=None: cpu (forced by $KVIK_DEVICE=cpu)" in env_report(manager)
