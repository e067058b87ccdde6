"""GGUF files as a kvik model format: config, Hugging Face-named weights, tokenizer.

Reading the config, tokenizer and quantization summary needs no torch (the MLX
platform resolves GGUF checkpoints through this class); only the weights
(:meth:`GGUFFormat.weights`), decoded with torch, import it, when first called.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kvik.models.formats import ModelFormat

from kvik_gguf.config import build_hf_config, check_architecture
from kvik_gguf.ggml_types import FLOAT_TYPES, check_supported, type_name
from kvik_gguf.index import GGUFIndex, open_index

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
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
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that only feed the config (rope_freqs: Llama 3.1 rope scaling factors).
_CONFIG_ONLY = {"rope_freqs.weight"}
# Dense parameters that iter_weights(quantized=True) hands over as their blocks (a GGUFWeight): the
# loader decodes them straight into the parameter, in the model's dtype (GGUFWeight.dequantize_into),
# instead of receiving the whole tensor in float32 first (SmolLM2's token embedding: 113 MB, next to
# its 56 MB bfloat16 parameter, was a one-chat run's peak memory).
_DENSE_FROM_BLOCKS = {"token_embd.weight", "output.weight"}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ValueError if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    raise ValueError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in kvik-gguf's llama-family mapping "
        f"(known: {', '.join(_GLOBAL_NAMES)}, blk.N.{{{','.join(_BLOCK_NAMES)}}}.weight/bias)"
    )


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, size: int, mtime_ns: int) -> Any:
    """A ``GGUFReader`` (a read-only memory map) per file version, shared by every engine in the process.

    Parsing the metadata of a 49k-token vocabulary costs seconds; size and
    mtime in the key make a rewritten file parse afresh.
    """
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        raise ValueError(
            f"cannot read GGUF file {path} ({size} bytes): {exc}. The file looks truncated or corrupt "
            "(an interrupted download or copy?); fetch it again"
        ) from exc


@functools.lru_cache(maxsize=4)
def _index(path: str, size: int, mtime_ns: int) -> GGUFIndex:
    """The file's metadata and tensor table (kvik_gguf.index: parsed once, then read from kvik's cache)."""
    return open_index(path, size, mtime_ns, lambda: _open_reader(path, size, mtime_ns))


def _logical_shape(tensor: Any) -> tuple[int, ...]:
    # GGUF lists dims innermost first (ne0 = columns); torch wants rows first.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


class GGUFFormat(ModelFormat):
    """One ``.gguf`` file (llama.cpp's single-file checkpoint with its tokenizer)."""

    name = "gguf"

    @classmethod
    def matches(cls, path: str) -> bool:
        p = Path(path)
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return True
        if p.suffix.lower() == ".gguf":
            raise ValueError(
                f"{path} is named .gguf but starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; "
                "it is not a GGUF file or it is damaged (a failed download saves an error page) - fetch it again"
            )
        return False

    # -- reading -----------------------------------------------------------
    @cached_property
    def index(self) -> GGUFIndex:
        stat = os.stat(self.path)
        return _index(os.path.realpath(self.path), stat.st_size, stat.st_mtime_ns)

    @cached_property
    def tensors(self) -> dict[str, Any]:
        return {t.name: t for t in self.index.tensors}

    def meta(self, key: str) -> Any:
        """A metadata value (str, number, or list), or None when the key is absent."""
        return self.index.meta(key)

    @cached_property
    def architecture(self) -> str:
        arch = self.meta("general.architecture")
        check_architecture(arch, self.path)
        return str(arch)

    def _linear_types(self) -> Counter[str]:
        return Counter(
            type_name(int(t.tensor_type))
            for name, t in self.tensors.items()
            if name not in _CONFIG_ONLY and hf_tensor_name(name).endswith("_proj.weight")
        )

    # -- ModelFormat -------------------------------------------------------
    def load_hf_config(self) -> Any:
        self.architecture  # noqa: B018 - validates before anything else is read
        for name, tensor in self.tensors.items():
            check_supported(int(tensor.tensor_type), name)
            if name not in _CONFIG_ONLY:
                hf_tensor_name(name)
        shapes = {name: _logical_shape(t) for name, t in self.tensors.items()}
        rope = self.tensors.get("rope_freqs.weight")
        rope_freqs = None if rope is None else self._float_values(rope)
        return build_hf_config(self.meta, shapes, rope_freqs, self.path, quantized=self.quantization() is not None)

    @cached_property
    def _hf_config(self) -> Any:
        return self.load_hf_config()

    def iter_weights(self, quantized: bool) -> Iterator[tuple[str, Any]]:
        from kvik_gguf.dequant import dequantize  # torch: only weights need it
        from kvik_gguf.weight import GGUFWeight, unpermute_rows

        config = self._hf_config
        _, _, permuted = check_architecture(self.architecture, self.path)
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        for name, tensor in self.tensors.items():
            if name in _CONFIG_ONLY:
                continue
            hf_name = hf_tensor_name(name)
            ggml_type = int(tensor.tensor_type)
            shape = _logical_shape(tensor)
            raw = self._raw_rows(tensor)
            part = name.split(".")[2] if name.startswith("blk.") else ""
            if permuted and part in heads:
                raw = unpermute_rows(raw, heads[part])
            if quantized and name == "token_embd.weight" and config.tie_word_embeddings and ggml_type != 0:
                # The tied head may multiply by these blocks packed (GGUFLinearMethod.pack_lm_head) and serve the
                # embedding's lookups from them too; yielded first, so that the dense embedding below is never
                # decoded when it does (the loader skips it).
                yield "lm_head.weight", GGUFWeight(raw, ggml_type, (shape[0], shape[1]))
            if quantized and ggml_type != 0 and (hf_name.endswith("_proj.weight") or name in _DENSE_FROM_BLOCKS):
                yield hf_name, GGUFWeight(raw, ggml_type, (shape[0], shape[1]))
            else:
                yield hf_name, dequantize(raw, ggml_type, shape)

    def load_tokenizer(self) -> Any:
        from kvik_gguf.tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(self.path, self.meta)

    def quantization(self) -> tuple[str, dict[str, Any]] | None:
        types = self._linear_types()
        if all(name in {type_name(t) for t in FLOAT_TYPES} for name in types):
            return None
        return "gguf", {"quant_method": "gguf", "file": Path(self.path).name, "linear_weight_types": dict(types)}

    def weight_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())

    # -- helpers -----------------------------------------------------------
    def _raw_rows(self, tensor: Any) -> torch.Tensor:
        """The tensor's bytes as ``[rows, bytes_per_row]`` uint8 (a fresh array: ``tensor.data`` reads the file)."""
        import torch

        shape = _logical_shape(tensor)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = tensor.data.reshape(rows, -1)
        return torch.from_numpy(data)

    def _float_values(self, tensor: Any) -> np.ndarray:
        """A stored-float tensor (F32 / F16 / BF16) as float32 numpy, decoded without torch."""
        ggml_type = int(tensor.tensor_type)
        raw = tensor.data
        if ggml_type == 0:
            values = raw.view(np.float32)
        elif ggml_type == 1:
            values = raw.view(np.float16).astype(np.float32)
        elif ggml_type == 30:  # bfloat16: the high half of a float32
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            from kvik_gguf.dequant import dequantize

            return dequantize(self._raw_rows(tensor), ggml_type, _logical_shape(tensor)).numpy()
        return values.reshape(_logical_shape(tensor))
