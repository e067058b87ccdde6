"""Real entry-point discovery: the distributions installed in this environment register through the kvik group.

Needs kvik-core, kvik-cpu and kvik-example-model installed (``pip install -e core -e platforms/cpu
-e plugins/example_model --no-deps``); other installed kvik plugins may come and go.
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
from kvik.plugins import manager as manager_mod
from kvik.plugins.manager import PluginManager

REQUIRED = {"kvik-core": "builtin", "kvik-cpu": "cpu", "kvik-example-model": "example_model"}


@pytest.fixture(autouse=True)
def _installed() -> None:
    found = {ep.dist.name: ep.name for ep in md.entry_points(group="kvik") if ep.dist is not None}
    missing = {dist for dist in REQUIRED if dist not in found}
    assert not missing, (
        f"{', '.join(sorted(missing))} not installed; run pip install -e core -e platforms/cpu "
        "-e plugins/example_model --no-deps"
    )


def test_process_wide_manager_discovers_installed_distributions() -> None:
    previous = manager_mod.set_plugin_manager(None)
    try:
        manager = manager_mod.get_plugin_manager()
        assert manager_mod.get_plugin_manager() is manager  # one per process
        loaded = dict(manager.plugins())
        for dist, name in REQUIRED.items():
            assert loaded.get(name) == dist
        entry = manager.models.entry("ParallelLlamaForCausalLM")
        assert (entry.plugin, entry.distribution) == ("example_model", "kvik-example-model")
        assert manager.models.entry("LlamaForCausalLM").distribution == "kvik-core"
        assert manager.platforms.entry("cpu").distribution == "kvik-cpu"
        assert manager.attention_backends.entry("torch_ref").distribution == "kvik-core"
    finally:
        manager_mod.set_plugin_manager(previous)


def test_installed_plugins_honour_the_block_list(monkeypatch) -> None:
    monkeypatch.setenv("KVIK_DISABLE_PLUGINS", "kvik-example-model")
    manager = PluginManager()
    assert "ParallelLlamaForCausalLM" not in manager.models
    assert "LlamaForCausalLM" in manager.models
    assert ("example_model", "kvik-example-model", "listed in KVIK_DISABLE_PLUGINS") in [
        (s.plugin, s.distribution, s.reason) for s in manager.skipped
    ]


def test_installed_plugins_honour_the_allow_list(monkeypatch) -> None:
    monkeypatch.setenv("KVIK_PLUGINS", "builtin,cpu")
    manager = PluginManager()
    assert [name for name, _ in manager.plugins()] == ["builtin", "cpu"]
    assert manager.platforms.names() == ["cpu"]
