"""The CUDA platform's model runner on the host CPU, for tests and host-side benchmarks.

``CUDAModelRunner`` keeps its step inputs in pinned buffers and pads decode steps to graph
buckets; on the CPU the buffers are plain host memory, so everything but the device work
(what the scheduler, the layout and the sampler cost, and that they are right) runs anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from kvik.config import EngineConfig
from kvik.platforms.interface import MemoryInfo, Platform

from kvik_cuda.platform import GPUOptions


class HostCUDAPlatform(Platform):
    name = "host-cuda"
    device_type = "cpu"
    options_type = GPUOptions

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> GPUOptions:
        # Eager layers unless asked; the rest as on a GPU.
        return GPUOptions(**{"fused_layers": False, **options})

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 34, free=1 << 33)

    def create_model_runner(self, config, model_config):  # type: ignore[no-untyped-def]
        from kvik_cuda.runner import CUDAModelRunner

        return CUDAModelRunner(config, model_config, torch.device("cpu"), self)
