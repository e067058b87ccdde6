from __future__ import annotations

import os
import sys

import pytest
from kvik.plugins.manager import PluginManager

# KVIK_TEST_WITHOUT_TORCH=1: run these tests with torch unimportable, as on a Mac with only MLX
# (tests/platforms/apple/test_without_torch.py runs the subset whose references need no torch).
if os.environ.get("KVIK_TEST_WITHOUT_TORCH") == "1":
    sys.modules["torch"] = None  # type: ignore[assignment]

# Each test module starts with pytest.importorskip("mlx.core", reason=MLX_MISSING), so
# without MLX the directory skips with this reason instead of failing to import.
MLX_MISSING = "kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)"


@pytest.fixture(autouse=True)
def _plugins(kvik_plugin_manager: PluginManager) -> PluginManager:
    """A fresh manager with the core, kvik-apple, and the CPU platform to compare against."""
    import kvik_apple.plugin
    import kvik_cpu.plugin

    assert kvik_plugin_manager.register(kvik_apple.plugin, "apple", "kvik-apple")
    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    return kvik_plugin_manager
