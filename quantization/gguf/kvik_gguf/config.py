"""GGUF metadata (llama.cpp key names) -> a Hugging Face ``PretrainedConfig``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# GGUF general.architecture -> (transformers config class, HF architecture, Q/K rows permuted by the converter)
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", True),
    "mistral": ("MistralConfig", "MistralForCausalLM", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
}

Meta = Callable[[str], Any]  # metadata key -> value, or None when absent


def check_architecture(arch: str | None, path: str) -> tuple[str, str, bool]:
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"GGUF file {path} holds a {arch!r} model, which kvik-gguf cannot load yet; "
            f"supported architectures: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch]


def build_hf_config(
    meta: Meta,
    tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None,
    path: str,
    quantized: bool = False,
) -> Any:
    """The transformers config for a llama-family GGUF.

    ``tensor_shapes`` maps GGUF tensor names to logical shapes (rows first), used
    where metadata is missing; ``rope_freqs`` is the ``rope_freqs.weight`` tensor
    (Llama 3.1-style rope scaling), if the file has one.

    ``dtype`` (what ``dtype="auto"`` starts from): float32 for a file of float weights, which
    decode to it exactly; bfloat16 when the linear weights are quantized blocks. Those name no
    float type of their own, and the platforms' fast paths for them compute in 16 bits (torch's
    packed int4 CPU kernel is a scalar loop in float32), so each platform's ``default_dtype``
    turns bfloat16 into its own choice (CPU: bfloat16 where the cores have native bf16, else float32).
    """
    import transformers

    arch = meta("general.architecture")
    config_cls_name, hf_arch, _ = check_architecture(arch, path)

    def key(name: str, default: Any = None) -> Any:
        value = meta(f"{arch}.{name}")
        return default if value is None else value

    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    intermediate = key("feed_forward_length")
    if intermediate is None:  # [intermediate, hidden]
        intermediate = tensor_shapes["blk.0.ffn_gate.weight"][0]
    vocab = key("vocab_size")
    if vocab is None:
        vocab = tensor_shapes["token_embd.weight"][0]
    context = int(key("context_length", 2048))
    theta = float(key("rope.freq_base", 10000.0))
    values: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=_rope_parameters(key, theta, head_dim, rope_freqs),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta("tokenizer.ggml.padding_token_id"),
        dtype="bfloat16" if quantized else "float32",
    )
    if arch == "llama":
        values["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
        values["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_shapes
    if arch in ("mistral", "qwen2"):
        window = key("attention.sliding_window")
        values["sliding_window"] = int(window) if window else None
    if arch == "qwen2":
        values["use_sliding_window"] = bool(values["sliding_window"])
    if arch == "llama":  # the light config (kvik_gguf.hf_configs: transformers' LlamaConfig costs 1.4 s to import)
        from kvik_gguf.hf_configs import GGUFLlamaConfig

        config = GGUFLlamaConfig(**values)
    else:  # Mistral's and Qwen2's configs derive fields (Qwen2's layer_types): transformers' own classes
        config = getattr(transformers, config_cls_name)(**values)
    config.architectures = [hf_arch]
    return config


def _rope_parameters(
    key: Callable[..., Any], theta: float, head_dim: int, rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    """transformers' ``rope_parameters`` from ``rope.scaling.*`` keys or a ``rope_freqs`` tensor."""
    scaling = key("rope.scaling.type")
    factor = key("rope.scaling.factor")
    if scaling == "linear" and factor:
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
    if scaling == "yarn" and factor:
        params: dict[str, Any] = {"rope_type": "yarn", "rope_theta": theta, "factor": float(factor)}
        original = key("rope.scaling.original_context_length")
        if original:
            params["original_max_position_embeddings"] = int(original)
        for gguf_name, hf_name in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            if key(gguf_name) is not None:
                params[hf_name] = float(key(gguf_name))
        return params
    if scaling not in (None, "none", "linear", "yarn"):
        raise ValueError(f"GGUF rope scaling type {scaling!r} is not supported; supported: none, linear, yarn, llama3")
    if rope_freqs is not None:
        return _llama3_rope(theta, head_dim, np.asarray(rope_freqs, dtype=np.float64))
    return {"rope_type": "default", "rope_theta": theta}


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores in ``rope_freqs`` for Llama 3.1-style scaling."""
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_rope(theta: float, head_dim: int, rope_freqs: np.ndarray) -> dict[str, Any]:
    """Recover Llama 3.1 rope parameters from the divisors the converter wrote.

    Only the ratios original/low and original/high matter, so we fix
    ``low_freq_factor = 1`` and solve for the rest from the interpolated band
    (``1/f = (1-s)/F + s`` with ``s`` linear in ``1/wavelength``); without such
    a band we fall back to Llama 3.1's published values. The result is checked
    by recomputing the factors.
    """
    factor = float(rope_freqs.max())
    candidates = [(1.0, 4.0, 8192.0)]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (rope_freqs > 1 + 1e-6) & (rope_freqs < factor - 1e-6)
    if factor > 1 and band.sum() >= 2:
        s = (1 / rope_freqs[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[band], s, 1)  # s = slope/wavelen + intercept
        if intercept < 0:
            high = 1 - 1 / intercept  # low=1: intercept = -1/(high-1)
            candidates.insert(0, (1.0, float(high), float(round(slope * (high - 1)))))
    for low, high, original in candidates:
        expected = llama3_rope_factors(theta, head_dim, factor, low, high, original)
        if np.allclose(expected, rope_freqs, rtol=1e-3, atol=1e-4):
            return {
                "rope_type": "llama3",
                "rope_theta": theta,
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": int(original),
            }
    raise ValueError(
        "this GGUF has a rope_freqs tensor that does not match Llama 3.1-style rope scaling; "
        "kvik-gguf supports rope scaling types none, linear, yarn and llama3"
    )
