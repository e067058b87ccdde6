"""Fixtures for model tests: a fresh plugin manager, a test CPU platform and runner factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvik.builtin
import pytest
import torch
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.plugins.manager import PluginManager
from kvik.testing.host_platform import HostCPUPlatform
from kvik.worker.torch_runner import TorchModelRunner


@pytest.fixture
def pm() -> PluginManager:
    manager = PluginManager(load_entrypoints=False)
    manager.register(kvik.builtin, "kvik.builtin")
    return manager


@pytest.fixture
def make_runner(pm: PluginManager) -> Callable[..., TorchModelRunner]:
    """``make_runner(path, num_blocks=256, **engine_options)`` -> a loaded runner with its KV cache."""

    def build(path: str | Path, num_blocks: int = 256, **options: Any) -> TorchModelRunner:
        options.setdefault("block_size", 4)
        platform = HostCPUPlatform()
        resolution = resolve_config(EngineConfig(model=str(path), **options), platform, pm)
        runner = TorchModelRunner(resolution.config, resolution.model_config, torch.device("cpu"), platform, pm)
        runner.load_model()
        runner.initialize_kv_cache(num_blocks)
        return runner

    return build


@pytest.fixture
def test_platform() -> HostCPUPlatform:
    return HostCPUPlatform()
