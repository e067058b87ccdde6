"""kvik-quant's plugin module: each format is a quantization method, registered like a third party's."""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_quantization_methods(register: RegisterFn) -> None:
    # Names are the checkpoints' quantization_config["quant_method"] (and what quantization= accepts).
    register("fp8", "kvik_quant.fp8:Fp8LinearMethod")
    register("compressed-tensors", "kvik_quant.compressed_tensors:CompressedTensorsMethod")
    register("gptq", "kvik_quant.int4:GPTQLinearMethod")
    register("awq", "kvik_quant.int4:AWQLinearMethod")
    register("int4", "kvik_quant.int4:Int4OnlineMethod")
    register("int8", "kvik_quant.int8:Int8LinearMethod")
