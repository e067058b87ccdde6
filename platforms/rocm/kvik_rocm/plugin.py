"""kvik-rocm's plugin module: registers the "rocm" platform (imported lazily by kvik)."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register: RegisterFn) -> None:
    register("rocm", "kvik_rocm.platform:ROCmPlatform")
