"""kvik_cpu.packed_linear: bfloat16 linears with oneDNN-packed weights give F.linear's bits, in the layer and end to end."""

from __future__ import annotations

import kvik_cpu.plugin
import pytest
import torch
import torch.nn.functional as F
from kvik.layers.linear import Linear
from kvik.sampling_params import SamplingParams
from kvik.testing.reference import random_prompts
from kvik_cpu.packed_linear import OneDNNLinear, onednn_bf16_supported, pack_linears, packed_bytes

needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_bf16_supported(), reason="no oneDNN, or this CPU lacks the AVX512 / AVX-NE-CONVERT its bfloat16 path needs"
)


def _linear(dtype: torch.dtype, bias: bool) -> Linear:
    torch.manual_seed(0)
    layer = Linear(96, [64, 32], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
        if bias:
            layer.bias.copy_(torch.randn_like(layer.bias))
    return layer.to(dtype)


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [False, True])
def test_packed_layer_gives_f_linear_bits_at_every_row_count(bias: bool) -> None:
    layer = _linear(torch.bfloat16, bias)
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    assert pack_linears(layer) == 1
    assert type(layer) is OneDNNLinear and layer.weight.is_meta and layer.weight.shape == weight.shape
    assert packed_bytes(layer) == weight.numel() * 2
    for shape in [(1, 96), (7, 96), (32, 96), (300, 96), (2, 5, 96)]:
        x = torch.randn(shape).to(torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, weight, b)), shape


def test_float32_layers_keep_f_linear() -> None:
    layer = _linear(torch.float32, bias=False)
    assert pack_linears(layer) == 0 and type(layer) is Linear


def test_a_cpu_without_onednn_bfloat16_kernels_keeps_f_linear(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    layer = _linear(torch.bfloat16, bias=True)
    assert pack_linears(layer) == 0 and type(layer) is Linear and not layer.weight.is_meta


def _generate(path, prompts, pack: bool, monkeypatch) -> list[list[int]]:
    import kvik

    if not pack:
        monkeypatch.setattr("kvik_cpu.runner.pack_linears", lambda model: 0)
    llm = kvik.LLM(model=str(path), device="cpu", dtype="bfloat16", num_threads=1, max_model_len=128,
                   num_kv_blocks=64)  # fmt: skip
    model = llm.llm_engine.runner.model
    assert any(isinstance(m, OneDNNLinear) for m in model.modules()) == pack
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    monkeypatch.undo()
    return [o.outputs[0].token_ids for o in outputs]


@needs_onednn_bf16
def test_bfloat16_engine_tokens_are_the_same_with_packed_weights(kvik_plugin_manager, tiny_model_dir, monkeypatch) -> None:
    kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    path = tiny_model_dir("llama")
    prompts = random_prompts(3, seed=5, high=24)  # prefill, then decode at batch 3, 2 and 1
    assert _generate(path, prompts, True, monkeypatch) == _generate(path, prompts, False, monkeypatch)
