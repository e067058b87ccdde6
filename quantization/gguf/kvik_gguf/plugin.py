"""kvik-gguf's plugin module: the "gguf" model format and quantization method."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_model_formats(register: RegisterFn) -> None:
    register("gguf", "kvik_gguf.format:GGUFFormat")


@hookimpl
def kvik_register_quantization_methods(register: RegisterFn) -> None:
    register("gguf", "kvik_gguf.method:GGUFLinearMethod")
