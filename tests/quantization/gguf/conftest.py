from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kvik.plugins.manager import PluginManager


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # Other test processes share the two cores; one torch thread each keeps runs predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with only what these tests use: the core, the CPU platform and kvik-gguf."""
    import kvik_cpu.plugin
    import kvik_gguf.plugin

    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(kvik_gguf.plugin, "gguf", "kvik-gguf")
    return kvik_plugin_manager
