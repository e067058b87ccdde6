"""kvik-cuda's plugin module: registers the "cuda" platform (imported lazily by kvik)."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register: RegisterFn) -> None:
    register("cuda", "kvik_cuda.platform:CUDAPlatform")
