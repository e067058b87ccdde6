"""Registers kvik_cuda.testing's host CUDA platform (the CUDA runner on the CPU) for the tests, and test backends."""

from __future__ import annotations

import types
from typing import Any

from kvik.plugins.hookspecs import hookimpl
from kvik_cuda.testing import HostCUDAPlatform

__all__ = ["HostCUDAPlatform", "register_small_tile_triton"]

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register) -> None:  # type: ignore[no-untyped-def]
    register(HostCUDAPlatform.name, "kvik_cuda.testing:HostCUDAPlatform")


def register_small_tile_triton(manager: Any, plugin_name: str) -> None:
    """Register the Triton backend with tiles small enough for the CPU interpreter as ``triton_interp``."""
    plugin = types.ModuleType(plugin_name)
    plugin.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]

    @hookimpl
    def kvik_register_attention_backends(register):  # type: ignore[no-untyped-def]
        register("triton_interp", "kvik_triton_attention.testing:SmallTileTritonAttentionBackend")

    plugin.kvik_register_attention_backends = kvik_register_attention_backends  # type: ignore[attr-defined]
    manager.register(plugin, plugin_name, "tests")
