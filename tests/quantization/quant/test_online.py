"""quantization="fp8" / "int4" on dense checkpoints through kvik.LLM, start-up errors, and `kvik plugins`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import kvik
import pytest
from kvik import SamplingParams
from kvik.entrypoints.reports import plugins_report
from kvik.plugins.manager import PluginManager
from kvik.testing.reference import random_prompts

PROMPTS = random_prompts(3, seed=7, low=4, high=20)
TINY = dict(hidden_size=128, intermediate_size=256)


def _greedy(model: Path, **kwargs: object) -> list[tuple[list[int], list[dict[int, float]]]]:
    llm = kvik.LLM(str(model), device="cpu", dtype="float32", num_kv_blocks=64, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    return [(list(o.token_ids), [{t: lp.logprob for t, lp in s.items()} for s in o.logprobs]) for o in outs]


def _first_divergence_in_top5(got: list, ref: list) -> None:
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, ref, strict=True):
        for pos, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)):
            if a != b:
                assert a in ref_lps[pos] and b in lps[pos], f"step {pos}: {a} vs {b} not in each other's top 5"
                break


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_online_w8a8_stays_close_to_dense(
    method: str, tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model_dir("llama", **TINY)
    dense = _greedy(model)
    monkeypatch.setenv("KVIK_QUANT_EMULATE", "1")  # fp8: the torch reference on CPU (int8 needs no opt-in)
    quantized = _greedy(model, quantization=method)
    _first_divergence_in_top5(quantized, dense)
    for (_, lps), (_, ref_lps) in zip(quantized, dense, strict=True):  # quantized, not noise: the same candidates
        assert len(set(lps[0]) & set(ref_lps[0])) >= 3


def test_online_int4_equals_its_dequantized_weights(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    """quantization="int4" runs exactly the round-to-nearest weights: a dense copy of them gives the same tokens."""
    import shutil

    import torch
    from kvik_quant.int4 import rtn_quantize
    from safetensors.torch import load_file, save_file

    model = tiny_model_dir("llama", **TINY)
    copy = tmp_path / "rtn"
    shutil.copytree(model, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    for name, w in tensors.items():
        if name.endswith("_proj.weight"):
            codes, scales, zeros = rtn_quantize(w, 128, symmetric=True)
            tensors[name] = ((codes - zeros.repeat_interleave(128, 1)) * scales.repeat_interleave(128, 1)).to(
                torch.float32
            )
    save_file(tensors, str(copy / "model.safetensors"))
    int4 = _greedy(model, quantization="int4")
    assert [t for t, _ in int4] == [t for t, _ in _greedy(copy)]


def test_online_fp8_refused_on_cpu_at_start_up(
    tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVIK_QUANT_EMULATE", raising=False)
    with pytest.raises(
        ValueError, match=r"quantization 'fp8' \(FP8 W8A8\) cannot run on cpu.*compute capability >= 8\.9"
    ):
        kvik.LLM(str(tiny_model_dir("llama", **TINY)), device="cpu", quantization="fp8")


def test_online_quantization_with_dummy_weights(tiny_model_dir: Callable[..., Path]) -> None:
    """load_format='dummy' (benchmarks): random dense weights are quantized like loaded ones."""
    llm = kvik.LLM(str(tiny_model_dir("llama", **TINY)), device="cpu", quantization="int4", load_format="dummy",
                   num_kv_blocks=64)  # fmt: skip
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "fp8", "quantized_weights": "dequantize"}, "would undo that"),
        (
            {"quantization": "gptq"},
            r"cannot quantize this dense checkpoint at load\. Methods that can: fp8, int4, int8",
        ),
        ({"quantization": "nf4"}, r"'nf4' is not an installed quantization method; installed: .*awq \(kvik-quant\)"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict, match: str, tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match=match):
        kvik.LLM(str(tiny_model_dir("llama", **TINY)), device="cpu", **kwargs)


def test_unsupported_quantization_config_names_format_and_plugins(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    model = tmp_path / "bnb"
    shutil.copytree(tiny_model_dir("llama", **TINY), model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant_method='bitsandbytes'.*installed quantization methods: .*"
                                         r"compressed-tensors \(kvik-quant\).*fp8 \(kvik-quant\).*gptq"):  # fmt: skip
        kvik.LLM(str(model), device="cpu")


def test_unsupported_compressed_tensors_scheme_is_named() -> None:
    from kvik_quant.compressed_tensors import CompressedTensorsMethod

    config = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True,
                              "symmetric": False}}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"scheme \(format int-quantized, weights int8 channel.*supported: FP8"):
        CompressedTensorsMethod.from_config(config)


def test_plugins_report_lists_devices_and_dtypes(kvik_plugin_manager: PluginManager) -> None:
    report = plugins_report(kvik_plugin_manager)
    lines = {line.split()[0]: line for line in report.splitlines()[report.splitlines().index("Quantization methods:") + 2 :]
             if line.strip()}  # fmt: skip
    assert "cuda (NVIDIA compute capability >= 8.9)" in lines["fp8"] and "bfloat16" in lines["fp8"]
    assert "cuda (Triton" in lines["gptq"] and "float16" in lines["gptq"]


def test_cuda_platform_keeps_methods_with_gpu_kernels_packed(kvik_plugin_manager: PluginManager) -> None:
    from kvik.config import EngineConfig, WeightsMode
    from kvik_cuda.platform import CUDAPlatform

    platform = CUDAPlatform()
    for method in ("fp8", "gptq", "awq", "compressed-tensors", "int8"):
        assert platform.quantized_weights_mode(EngineConfig(), method) is WeightsMode.QUANTIZED
    assert platform.quantized_weights_mode(EngineConfig(), "not-installed") is WeightsMode.DEQUANTIZE
