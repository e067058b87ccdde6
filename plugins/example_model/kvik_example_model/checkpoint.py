"""Write a tiny random ParallelLlama checkpoint (for tests, docs and demos; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvik_example_model import ARCHITECTURE


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """config.json contents: Llama hyper-parameters under ``model_type: llama``, our architecture name."""
    config: dict[str, Any] = dict(
        architectures=[ARCHITECTURE],
        model_type="llama",  # transformers parses it as a LlamaConfig; kvik picks the class by architecture
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    config.update(overrides)
    return config


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Hugging Face-named random tensors (float32) for ``config``; norms near 1 so they matter but stay stable."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads

    def dense(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.15  # wide enough that greedy decoding has clear winners

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(h, generator=gen)

    weights = {"model.embed_tokens.weight": dense(vocab, h), "model.norm.weight": norm()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "self_attn.q_proj.weight"] = dense(heads * head_dim, h)
        weights[p + "self_attn.k_proj.weight"] = dense(kv_heads * head_dim, h)
        weights[p + "self_attn.v_proj.weight"] = dense(kv_heads * head_dim, h)
        weights[p + "self_attn.o_proj.weight"] = dense(h, heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = dense(inter, h)
        weights[p + "mlp.up_proj.weight"] = dense(inter, h)
        weights[p + "mlp.down_proj.weight"] = dense(h, inter)
    if not config.get("tie_word_embeddings"):
        weights["lm_head.weight"] = dense(vocab, h)
    return weights


def make_tiny_parallel_llama(path: str | Path, seed: int = 0, dtype: str = "float32", **overrides: Any) -> Path:
    """Write config.json, model.safetensors and a tokenizer (kvik's tiny BPE, ChatML template) to ``path``."""
    import json

    import torch
    from kvik.testing.tiny_models import build_tokenizer
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(torch_dtype=dtype, **overrides)
    tokenizer = build_tokenizer(config["vocab_size"])
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {config['vocab_size']}")
    weights = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in random_weights(config, seed).items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return path
