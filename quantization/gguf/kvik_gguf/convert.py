"""A small Hugging Face -> GGUF writer for llama-family checkpoints (tests, benchmarks, examples).

It writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for these models
- metadata under llama.cpp's keys, the byte-level BPE vocabulary, and tensors
renamed with q/k rows interleaved for llama/mistral - and quantizes with
gguf-py (types gguf-py can quantize: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
It is not a replacement for llama.cpp's converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_HF_BLOCK[module]}.{parts[-1]}"


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves ``[2, half]`` interleaved to ``[half, 2]``."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    qtype: str = "F32",
    tensor_types: dict[str, str] | None = None,
    arch: str | None = None,
) -> Path:
    """Convert the safetensors checkpoint in ``model_dir`` to ``out_path``.

    Linear (``*_proj``) weights are stored as ``qtype``; ``tensor_types`` maps
    HF names to other types (e.g. embeddings); everything else is F32. ``arch``
    overrides the GGUF architecture name (default: the config's ``model_type``).
    """
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    arch = arch or config.model_type
    weights: dict[str, np.ndarray] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    writer = gguf.GGUFWriter(str(out_path), arch)
    _write_metadata(writer, config)
    _write_tokenizer(writer, AutoTokenizer.from_pretrained(model_dir))
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensor_types = tensor_types or {}
    for name, value in weights.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        value = value.astype(np.float32)
        proj = name.split(".")[-2]
        if arch in ("llama", "mistral") and proj in heads:
            value = permute_rows(value, heads[proj])
        type_name = tensor_types.get(name, qtype if name.endswith("_proj.weight") else "F32")
        ggml_type = gguf.GGMLQuantizationType[type_name]
        packed = gguf.quants.quantize(value, ggml_type)
        writer.add_tensor(gguf_tensor_name(name), packed, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _write_metadata(writer: Any, config: Any) -> None:
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        writer.add_sliding_window(int(config.sliding_window))


def _write_tokenizer(writer: Any, tokenizer: Any) -> None:
    """A byte-level BPE vocabulary as llama.cpp stores it (``tokenizer.ggml.model = gpt2``)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = CONTROL, 1 = NORMAL
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
