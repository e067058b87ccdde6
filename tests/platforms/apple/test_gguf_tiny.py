"""Tiny GGUF files written from tiny HF checkpoints: the MLX loader against HF and against the torch path.

kvik-gguf's writer stores what llama.cpp's converter stores (q/k rows
interleaved for llama/mistral, none for qwen2), so an F32 GGUF must give
exactly HF's greedy tokens, and the packed types must give the torch path's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")
pytest.importorskip("kvik_gguf", reason="needs kvik-gguf (its GGUF writer and format)")

from kvik import LLM, SamplingParams
from kvik.plugins.manager import PluginManager
from kvik.testing.reference import hf_greedy, random_prompts

NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
MODELS = {
    "llama": dict(arch="llama"),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=12),
    "qwen2-bias-tied": dict(arch="qwen2", tie_word_embeddings=True),
}


@pytest.fixture(autouse=True)
def _gguf_format(_plugins: PluginManager) -> None:
    import kvik_gguf.plugin

    assert _plugins.register(kvik_gguf.plugin, "gguf", "kvik-gguf")


def _write(model_dir: Path, tmp_path: Path, qtype: str) -> Path:
    from kvik_gguf.convert import write_gguf

    return write_gguf(model_dir, tmp_path / f"{model_dir.name}-{qtype}.gguf", qtype=qtype)


def _tokens(path: Path, device: str = "apple", **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device=device, dtype="float32", num_kv_blocks=64, max_model_len=128, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY)]


def _prompts() -> list[list[int]]:
    return random_prompts(4, seed=21, low=4, high=40)


@pytest.mark.parametrize("name", list(MODELS))
def test_f32_gguf_matches_hf(tiny_model_dir, tmp_path, name):
    model_dir = tiny_model_dir(**MODELS[name])
    gguf_path = _write(model_dir, tmp_path, "F32")
    assert _tokens(gguf_path) == hf_greedy(model_dir, _prompts(), NEW)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_packed_types_match_the_torch_path(tiny_model_dir, tmp_path, qtype):
    gguf_path = _write(tiny_model_dir(**MODELS["llama"]), tmp_path, qtype)
    torch_tokens = _tokens(gguf_path, device="cpu", quantized_weights="dequantize")
    assert _tokens(gguf_path, quantized_weights="dequantize") == torch_tokens
    packed = _tokens(gguf_path, quantized_weights="quantized")  # nn.QuantizedLinear on the packed blocks
    assert sum(a == b for a, b in zip(packed, torch_tokens, strict=True)) >= len(torch_tokens) - 1
