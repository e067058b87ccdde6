"""Loading checkpoints into the MLX model without torch.

Safetensors directories and GGUF files are both read by ``mx.load``. GGUF
Q4_0 / Q4_1 / Q8_0 tensors arrive packed as MLX affine-quantized triples
(``weight`` uint32, ``scales``, ``biases``; group size 32), which either feed
``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` as they are ("quantized"
mode) or are dequantized to the compute dtype at load ("dequantize" mode).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvik_apple.model import LlamaArgs, MLXCausalLM

GGUF_GROUP_SIZE = 32  # every block-quantized GGUF type MLX keeps packed uses blocks of 32

_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF tensors that carry nothing this model needs (llama3 rope factors come from the HF config).
_GGUF_SKIP = ("rope_freqs.weight",)
# general.architecture -> whether llama.cpp's converter interleaved the q/k rows.
_GGUF_ARCHS = {"llama": True, "mistral": True, "qwen2": False}


def checkpoint_path(source: Any, fallback: str | None) -> str:
    """The path on disk behind ``ModelConfig.source`` (a ModelFormat or a path)."""
    path = getattr(source, "path", source) if source is not None else fallback
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"the apple platform needs a checkpoint path; ModelConfig.source was {source!r}")
    return os.fspath(path)


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def read_safetensors_dir(path: str) -> dict[str, mx.array]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {path!r}; the apple platform reads safetensors or .gguf")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(file))  # type: ignore[arg-type]
    return weights


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation.

    llama.cpp's converter stores, per head, the rotary halves interleaved
    (row ``h*D + 2*i + j`` holds HF row ``h*D + j*D/2 + i``) so its kernels can
    use the "traditional" rope. Taking rows in this order restores HF layout;
    it permutes whole output rows, so it applies to packed weights, scales and
    biases alike.
    """
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def read_gguf(path: str, args: LlamaArgs) -> dict[str, mx.array]:
    """GGUF tensors renamed to HF names (quantized ones as ``.weight/.scales/.biases`` triples)."""
    raw, metadata = mx.load(path, return_metadata=True)  # type: ignore[misc]
    arch = str(metadata.get("general.architecture", "llama"))
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"GGUF file {path!r} holds a {arch!r} model; the apple (MLX) platform loads GGUF architectures "
            f"{', '.join(_GGUF_ARCHS)}"
        )
    out: dict[str, mx.array] = {}
    for name, value in raw.items():
        if name in _GGUF_SKIP:
            continue
        base, _, suffix = name.rpartition(".")
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        if match:
            layer, part = match.groups()
            if part not in _GGUF_LAYER:
                raise ValueError(f"unexpected GGUF tensor {name!r} in {path!r} (architecture {arch!r})")
            hf_base = f"model.layers.{layer}.{_GGUF_LAYER[part]}"
        elif base in _GGUF_GLOBAL:
            hf_base = _GGUF_GLOBAL[base]
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} in {path!r} (architecture {arch!r})")
        # llama.cpp interleaves Q/K rows for llama-arch files (SmolLM2, most Mistrals) and "mistral".
        if _GGUF_ARCHS[arch] and hf_base.endswith(("q_proj", "k_proj")):
            heads = args.num_heads if hf_base.endswith("q_proj") else args.num_kv_heads
            value = value[mx.array(_unpermute_rows(value.shape[0], heads))]
        out[f"{hf_base}.{suffix}"] = value
    return out


def _packed_bits(weights: dict[str, mx.array], base: str) -> int:
    # weight: [out, in * bits / 32] uint32; scales: [out, in / group]
    packed_cols, groups = weights[f"{base}.weight"].shape[-1], weights[f"{base}.scales"].shape[-1]
    return packed_cols * 32 // (groups * GGUF_GROUP_SIZE)


def _packed_bases(weights: dict[str, mx.array]) -> list[str]:
    return [k[: -len(".scales")] for k in weights if k.endswith(".scales")]


def dequantize_all(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Replace every packed triple by a dense ``dtype`` weight (exact: computed in float32)."""
    out = dict(weights)
    for base in _packed_bases(weights):
        bits = _packed_bits(weights, base)
        dense = mx.dequantize(
            out.pop(f"{base}.weight"),
            out.pop(f"{base}.scales").astype(mx.float32),  # fp16 in the file; fp16 math would round
            out.pop(f"{base}.biases").astype(mx.float32),
            group_size=GGUF_GROUP_SIZE,
            bits=bits,
        )
        out[f"{base}.weight"] = dense.astype(dtype)
    return out


def load_into(model: MLXCausalLM, weights: dict[str, mx.array], dtype: mx.Dtype, quantized: bool) -> None:
    """Load HF-named ``weights`` into ``model`` (strict: missing or unknown names raise).

    With ``quantized``, modules whose weights arrive packed become MLX
    quantized modules first; everything else is cast to ``dtype``.
    """
    weights = model.sanitize(weights)
    if quantized:
        bits = {base: _packed_bits(weights, base) for base in _packed_bases(weights)}

        def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
            if path not in bits:
                return False
            return {"group_size": GGUF_GROUP_SIZE, "bits": bits[path]}

        nn.quantize(model, class_predicate=predicate)
    else:
        weights = dequantize_all(weights, dtype)
    # Packed uint32 stays; scales/biases follow the compute dtype (fp16 -> fp32 is exact).
    cast = {k: (v if v.dtype == mx.uint32 else v.astype(dtype)) for k, v in weights.items()}
    model.load_weights(list(cast.items()), strict=True)
    mx.eval(model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
