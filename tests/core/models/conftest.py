"""Fixtures for model tests: a fresh plugin manager, a test CPU platform and runner factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import kvik.builtin
import pytest
import torch
from kvik.config import EngineConfig
from kvik.models.model_config import build_model_config, resolve_format
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
        config = EngineConfig(model=str(path), **options)
        platform.configure(config)
        fmt = resolve_format(str(path), pm)
        model_config = build_model_config(config, fmt, pm, platform)
        runner = TorchModelRunner(config, model_config, torch.device("cpu"), platform, pm)
        runner.load_model()
        runner.initialize_kv_cache(num_blocks)
        return runner

    return build


@pytest.fixture
def test_platform() -> HostCPUPlatform:
    return HostCPUPlatform()
