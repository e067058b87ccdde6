"""The host CPU as the smallest real Platform, for tests and the conformance suite.

The core cannot depend on kvik-cpu, yet its tests need a platform to build a
``TorchModelRunner``: this one runs torch on the CPU with the base class's
defaults and no tuning (threads, dtype choice, KV cap are kvik-cpu's job).
"""

from __future__ import annotations

import psutil
import torch

from kvik.config import ModelConfig, ResolvedConfig
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.worker.interface import ModelRunner


class HostCPUPlatform(Platform):
    name = "host-cpu"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        vm = psutil.virtual_memory()
        return MemoryInfo(total=vm.total, free=vm.available)

    def create_model_runner(self, config: ResolvedConfig, model_config: ModelConfig) -> ModelRunner:
        from kvik.worker.torch_runner import TorchModelRunner

        return TorchModelRunner(config, model_config, torch.device("cpu"), self)
