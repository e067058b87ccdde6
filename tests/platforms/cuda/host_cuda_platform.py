"""A test platform that runs the CUDA platform's runner (pinned step inputs, buckets) on the CPU."""

from __future__ import annotations

import types
from typing import Any

import torch
from kvik.config import EngineConfig
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.plugins.hookspecs import hookimpl
from kvik_cuda.platform import GPUOptions

KVIK_PLUGIN_API = ">=2.0,<3"


class HostCUDAPlatform(Platform):
    name = "host-cuda"
    device_type = "cpu"
    options_type = GPUOptions

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> GPUOptions:
        return GPUOptions(fused_layers=options.get("fused_layers", False))  # eager layers unless a test asks

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 34, free=1 << 33)

    def create_model_runner(self, config, model_config):  # type: ignore[no-untyped-def]
        from kvik_cuda.runner import CUDAModelRunner

        return CUDAModelRunner(config, model_config, torch.device("cpu"), self)


@hookimpl
def kvik_register_platforms(register) -> None:  # type: ignore[no-untyped-def]
    register("host-cuda", f"{__name__}:HostCUDAPlatform")


def register_small_tile_triton(manager: Any, plugin_name: str) -> None:
    """Register the Triton backend with tiles small enough for the CPU interpreter as ``triton_interp``."""
    plugin = types.ModuleType(plugin_name)
    plugin.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]

    @hookimpl
    def kvik_register_attention_backends(register):  # type: ignore[no-untyped-def]
        register("triton_interp", "kvik_triton_attention.testing:SmallTileTritonAttentionBackend")

    plugin.kvik_register_attention_backends = kvik_register_attention_backends  # type: ignore[attr-defined]
    manager.register(plugin, plugin_name, "tests")
