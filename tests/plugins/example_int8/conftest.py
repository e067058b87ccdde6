from __future__ import annotations

import pytest
from kvik.plugins.manager import PluginManager


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with the core, the CPU platform and the example plugin only."""
    import kvik_cpu.plugin
    import kvik_example_int8.plugin

    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(kvik_example_int8.plugin, "example_int8", "kvik-example-int8")
    return kvik_plugin_manager
