"""Fresh plugins for kvik-quant's tests; makes ``quant_checkpoints`` importable under --import-mode=importlib."""

from __future__ import annotations

import os
import sys

import pytest
from kvik.plugins.manager import PluginManager

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with only what these tests use: the core, the CPU platform and kvik-quant."""
    import kvik_cpu.plugin
    import kvik_quant.plugin

    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(kvik_quant.plugin, "quant", "kvik-quant")
    return kvik_plugin_manager
