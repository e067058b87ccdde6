"""Tiny random GGUF models generate through kvik.LLM like the same weights from safetensors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kvik
import pytest
import torch
from kvik import SamplingParams
from kvik.testing.reference import random_prompts
from kvik_gguf.convert import write_gguf

PROMPTS = random_prompts(6, seed=3, low=4, high=40)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _greedy(model: str, **kwargs: object) -> list[list[int]]:
    llm = kvik.LLM(model, device="cpu", dtype="float32", num_kv_blocks=64, **kwargs)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_generates_like_safetensors(arch: str, tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = tiny_model_dir(arch)
    gguf_path = write_gguf(model_dir, tmp_path / f"{arch}.gguf", "F32")
    assert _greedy(str(gguf_path)) == _greedy(str(model_dir))


def test_quantized_gguf_same_in_both_weight_modes_and_close_to_hf(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Q8_0: packed-in-memory and dequantized-at-load decode the same blocks, so tokens match exactly;
    HF transformers loading the same GGUF (its own dequantizer and Q/K un-permutation) agrees too."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    gguf_path = write_gguf(model_dir, tmp_path / "q8.gguf", "Q8_0")
    dense = _greedy(str(gguf_path), quantized_weights="dequantize")
    packed = _greedy(str(gguf_path), quantized_weights="quantized")
    assert packed == dense

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q8.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, ours in zip(PROMPTS, dense, strict=True):
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
            assert out[0, len(prompt) :].tolist() == ours


def test_quantized_mode_keeps_blocks_packed(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    gguf_path = write_gguf(tiny_model_dir("llama"), tmp_path / "q4.gguf", "Q4_0")
    dense = kvik.LLM(str(gguf_path), device="cpu", dtype="float32", num_kv_blocks=64, quantized_weights="dequantize")
    packed = kvik.LLM(str(gguf_path), device="cpu", dtype="float32", num_kv_blocks=64, quantized_weights="quantized")
    dense_bytes = dense.llm_engine.runner.weight_bytes()
    packed_bytes = packed.llm_engine.runner.weight_bytes()
    # 14 linear weights of 64x64..128x64: float32 is 4 bytes/value, Q4_0 is 18/32 bytes/value
    # (float32 activations keep the raw blocks; bfloat16 ones repack them, see test_int4pack.py)
    linear_values = 2 * (64 * 64 + 32 * 64 * 2 + 64 * 64 + 3 * 128 * 64)
    assert dense_bytes - packed_bytes == linear_values * 4 - linear_values * 18 // 32
