"""The plugin module kvik loads through the ``kvik`` entry point ``example_int8``."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_quantization_methods(register: RegisterFn) -> None:
    # The name is the checkpoint's quantization_config["quant_method"]; the class is imported on first use.
    register("example_int8", "kvik_example_int8.method:Int8LinearMethod")
