from __future__ import annotations

import pytest
from kvik.plugins.manager import PluginManager


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with only what these tests use: the core, the CPU platform and kvik-gguf."""
    import kvik_cpu.plugin
    import kvik_gguf.plugin

    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(kvik_gguf.plugin, "gguf", "kvik-gguf")
    return kvik_plugin_manager
