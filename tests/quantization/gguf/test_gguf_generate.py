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


def test_tied_head_multiplies_by_the_packed_embedding_blocks(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    """In bfloat16 on the CPU a tied head whose embedding is Q8_0 runs through the int4 kernel's two-plane
    form: the same logits as the dense head up to bfloat16 rounding, the same greedy tokens."""
    from kvik.layers.embedding import LMHead

    model_dir = tiny_model_dir("llama", tie_word_embeddings=True)
    gguf_path = write_gguf(model_dir, tmp_path / "tied.gguf", "Q4_0", {"model.embed_tokens.weight": "Q8_0"})
    llm = kvik.LLM(str(gguf_path), device="cpu", dtype="bfloat16", num_kv_blocks=64, quantized_weights="quantized")
    model = llm.llm_engine.runner.model
    head = model.lm_head
    assert isinstance(head, LMHead) and head.tied and head.packed_matmul is not None
    hidden = torch.randn(5, head.head_weight.shape[1], dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    packed = head(hidden)
    dense = torch.nn.functional.linear(hidden.float(), head.head_weight.float())
    assert packed.dtype == torch.float32 and packed.shape == dense.shape
    assert ((packed - dense).norm() / dense.norm()).item() < 2e-2  # bf16 activations and scales, bf16 output
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with_packed = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    head.packed_matmul = None
    with_dense = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    # Random tiny weights have near ties; bfloat16 rounding may flip one late token, not the whole run.
    same = sum(a == b for a, b in zip(with_packed, with_dense, strict=True))
    assert same >= len(PROMPTS) - 1, (with_packed, with_dense)

    # float32 keeps the exact dense head (the kernel is only fast in bfloat16), as does dequantize mode.
    for kwargs in ({"dtype": "float32", "quantized_weights": "quantized"},
                   {"dtype": "bfloat16", "quantized_weights": "dequantize"}):  # fmt: skip
        other = kvik.LLM(str(gguf_path), device="cpu", num_kv_blocks=64, **kwargs)
        assert other.llm_engine.runner.model.lm_head.packed_matmul is None
