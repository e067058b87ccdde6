"""kvik-apple's plugin module: the "apple" platform and the "mlx_paged" attention backend."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register: RegisterFn) -> None:
    register("apple", "kvik_apple.platform:ApplePlatform")


@hookimpl
def kvik_register_attention_backends(register: RegisterFn) -> None:
    register("mlx_paged", "kvik_apple.attention:MLXPagedAttentionBackend")
