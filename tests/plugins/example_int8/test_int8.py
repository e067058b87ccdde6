"""The example int8 plugin: its method against the contract, its converter, and generation through kvik.LLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import kvik
import pytest
import torch
import torch.nn.functional as F
from kvik import SamplingParams
from kvik.layers.linear import Linear
from kvik.testing.conformance.quantization import check_quantization_method
from kvik.testing.reference import random_prompts
from kvik_example_int8 import quantize_checkpoint
from kvik_example_int8.method import Int8LinearMethod, quantize_int8
from safetensors.torch import load_file, save_file


def test_conformance() -> None:
    check_quantization_method(Int8LinearMethod, {"quant_method": "example_int8"}, max_weight_rel_error=0.02)


def test_dequantize_then_matmul_equals_apply() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(96, 64, generator=gen)
    layer = Linear(64, [64, 32], quant_method=Int8LinearMethod())
    for shard, rows in enumerate((slice(0, 64), slice(64, 96))):
        q, scale = quantize_int8(dense[rows])
        layer.load("weight", q, shard)
        layer.load("weight_scale", scale, shard)
    weight = layer.quant_method.dequantize(layer)
    assert float((weight - dense).norm() / dense.norm()) < 0.01
    x = torch.randn(3, 5, 64, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert layer.quant_method.weight_bytes(layer) == 96 * 64 + 96 * 4  # int8 values + float32 scales


def test_load_errors() -> None:
    layer = Linear(64, 32, quant_method=Int8LinearMethod())
    with pytest.raises(ValueError, match="must be int8"):
        layer.load("weight", torch.zeros(32, 64))
    with pytest.raises(ValueError, match="unexpected parameter 'qweight'"):
        layer.load("qweight", torch.zeros(32, 64, dtype=torch.int8))


def test_quantize_checkpoint(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    dst = quantize_checkpoint(src, tmp_path / "int8")
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == {"quant_method": "example_int8"}
    assert (dst / "tokenizer.json").is_file()
    original, converted = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    for name, value in original.items():
        if name.endswith("_proj.weight"):
            assert converted[name].dtype == torch.int8
            restored = converted[name].float() * converted[f"{name}_scale"][:, None]
            assert float((restored - value).norm() / value.norm()) < 0.01, name
        else:
            torch.testing.assert_close(converted[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again")


def _restored_checkpoint(src: Path, int8_dir: Path, out: Path) -> Path:
    """``src`` with each linear weight replaced by its int8 round trip ``q * scale``, stored dense."""
    shutil.copytree(src, out)
    packed = load_file(str(int8_dir / "model.safetensors"))
    dense = {
        name: value.float() * packed[f"{name}_scale"][:, None] if value.dtype == torch.int8 else value
        for name, value in packed.items()
        if not name.endswith("_scale")
    }
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("mode", ["quantized", "dequantize"])
def test_generates_close_to_dense(mode: str, tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    dst = quantize_checkpoint(src, tmp_path / "int8")
    prompts = random_prompts(12, seed=5, low=4, high=40)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def greedy(path: Path, **kwargs: object) -> list[list[int]]:
        llm = kvik.LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, **kwargs)
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]

    int8 = greedy(dst, quantized_weights=mode)
    # Exactly the dense model whose weights are the int8 round trip: the plugin adds no error of its own.
    assert int8 == greedy(_restored_checkpoint(src, dst, tmp_path / "restored"))

    dense = greedy(src)
    same_prompts = sum(a == b for a, b in zip(dense, int8, strict=True))
    same_first = sum(a[0] == b[0] for a, b in zip(dense, int8, strict=True))
    same_tokens = sum(x == y for a, b in zip(dense, int8, strict=True) for x, y in zip(a, b, strict=True))
    total = sum(len(a) for a in dense)
    print(
        f"example_int8 ({mode}) vs dense: {same_prompts}/{len(prompts)} prompts identical, "
        f"{same_first}/{len(prompts)} first tokens, {same_tokens}/{total} tokens at the same position"
    )
    # Int8 moves the logits by ~1%; a random tiny model has near-ties, so a sequence may fork after
    # which its later positions differ. The first token must mostly agree.
    assert same_first >= 0.75 * len(prompts)


def test_found_through_its_entry_point() -> None:
    """The installed distribution is discovered like any third-party plugin."""
    from kvik.plugins.manager import PluginManager

    manager = PluginManager(load_entrypoints=True)
    assert "example_int8" in manager.quantization_methods.names()
    assert manager.quantization_methods.get("example_int8") is Int8LinearMethod
