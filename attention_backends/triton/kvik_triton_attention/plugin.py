"""Entry point ``triton`` of the ``kvik`` group: registers the attention backend."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_attention_backends(register: RegisterFn) -> None:
    register("triton", "kvik_triton_attention.backend:TritonAttentionBackend")
