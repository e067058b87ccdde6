"""Fixtures for model tests: a fresh plugin manager, a test CPU platform and runner factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kvik.builtin
import psutil
import pytest
import torch
from kvik.config import EngineConfig, ModelConfig
from kvik.models.loader import build_model_config, resolve_format
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.plugins.manager import PluginManager
from kvik.worker.torch_runner import TorchModelRunner


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # Other test processes share the cores; one thread keeps runs predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TestCPUPlatform(Platform):
    """The smallest real platform: torch on the CPU (the cpu plugin is tested elsewhere)."""

    __test__ = False
    name = "test-cpu"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        vm = psutil.virtual_memory()
        return MemoryInfo(total=vm.total, free=vm.available)

    def create_model_runner(self, config: EngineConfig, model_config: ModelConfig) -> TorchModelRunner:
        return TorchModelRunner(config, model_config, torch.device("cpu"), self)


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
        platform = TestCPUPlatform()
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
def test_platform() -> TestCPUPlatform:
    return TestCPUPlatform()
