from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kvik.plugins.manager import PluginManager

# Each test module starts with pytest.importorskip("mlx.core", reason=MLX_MISSING), so
# without MLX the directory skips with this reason instead of failing to import.
MLX_MISSING = "kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)"


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # Other test processes share the two cores; one torch thread each keeps runs predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with the core, kvik-apple, and the CPU platform to compare against."""
    import kvik_apple.plugin
    import kvik_cpu.plugin

    assert kvik_plugin_manager.register(kvik_apple.plugin, "apple", "kvik-apple")
    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    return kvik_plugin_manager
