"""Writing and reading the test checkpoints: GPTQ / AWQ / HF-fp8 files in their exact on-disk layouts, and
dense float32 copies of any quantized checkpoint for transformers to run as the reference.

GPTQModel and AutoAWQ do not install here (CUDA source builds), so GPTQ and AWQ files are written from
their specs (the packings are in kvik_quant.int4_pack's docstring); the dequantizers below are written
independently of kvik-quant's (element by element from the spec), so the two are checked against each other.
compressed-tensors fixtures are made by llm-compressor itself (make_fixtures.py) and decompressed by the
compressed-tensors package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from kvik.testing.tiny_models import build_tokenizer
from kvik_quant import int4_pack as pack
from kvik_quant.int4 import rtn_quantize
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def _finish(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    else:
        config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    build_tokenizer(int(config["vocab_size"])).save_pretrained(dst)
    return dst


def fixture(name: str, dst: Path) -> Path:
    """A committed llm-compressor checkpoint, with kvik's tiny tokenizer added."""
    src = FIXTURES / name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    build_tokenizer(512).save_pretrained(dst)
    return dst


def write_gptq(dense_dir: Path, dst: Path, group: int, act_order: bool, seed: int = 0) -> Path:
    """AutoGPTQ/GPTQModel v1 layout (asymmetric, zero - 1 stored); act-order permutes each layer's groups."""
    tensors = {}
    gen = torch.Generator().manual_seed(seed)
    perms: dict[int, torch.Tensor] = {}  # by input size: q/k/v (and gate/up) share their input, so their g_idx
    for name, value in load_file(str(dense_dir / "model.safetensors")).items():
        if not _is_linear(name):
            tensors[name] = value
            continue
        k = value.shape[1]
        if k not in perms:
            perms[k] = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
        perm = perms[k]
        codes_p, scales, zeros = rtn_quantize(value[:, perm], group, symmetric=False, min_zero=1)
        codes = torch.empty_like(codes_p)
        codes[:, perm] = codes_p
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
        base = name.removesuffix(".weight")
        tensors[f"{base}.qweight"] = pack.pack_rows(codes.t())
        tensors[f"{base}.qzeros"] = pack.pack_last((zeros - 1).t())
        tensors[f"{base}.scales"] = scales.t().to(torch.float16)
        tensors[f"{base}.g_idx"] = g_idx
    config = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
              "checkpoint_format": "gptq"}  # fmt: skip
    return _finish(dense_dir, dst, tensors, config)


def write_awq(dense_dir: Path, dst: Path, group: int) -> Path:
    """AutoAWQ GEMM layout: qweight [K, N/8] and qzeros [K/G, N/8] interleaved along N, fp16 scales."""
    tensors = {}
    for name, value in load_file(str(dense_dir / "model.safetensors")).items():
        if not _is_linear(name):
            tensors[name] = value
            continue
        codes, scales, zeros = rtn_quantize(value, group, symmetric=False)
        base = name.removesuffix(".weight")
        tensors[f"{base}.qweight"] = pack.pack_awq(codes.t())
        tensors[f"{base}.qzeros"] = pack.pack_awq(zeros.t())
        tensors[f"{base}.scales"] = scales.t().to(torch.float16)
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return _finish(dense_dir, dst, tensors, config)


def write_hf_fp8_block(ct_block_dir: Path, dst: Path) -> Path:
    """The Hugging Face / DeepSeek ``fp8`` layout (``weight_scale_inv`` per 128x128 block) from llm-compressor's FP8_BLOCK."""
    tensors = {}
    for name, value in load_file(str(ct_block_dir / "model.safetensors")).items():
        tensors[name.replace(".weight_scale", ".weight_scale_inv")] = value.float() if "scale" in name else value
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    return _finish(ct_block_dir, dst, tensors, config)


# -- dense references ----------------------------------------------------------------------------------
def _nibble(words: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return (words.to(torch.int64) >> (4 * j)) & 0xF


def _gptq_dense(t: dict[str, torch.Tensor], base: str, offset: int) -> torch.Tensor:
    qweight, qzeros, scales, g_idx = (t[f"{base}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx"))
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    q = _nibble(qweight[kk // 8, nn], kk % 8)  # [K, N]
    g = g_idx.to(torch.int64)[:, None]
    z = _nibble(qzeros[g, nn // 8], nn % 8) + offset
    return ((q - z) * scales.float()[g, nn]).t()


def _awq_dense(t: dict[str, torch.Tensor], base: str, group: int) -> torch.Tensor:
    qweight, qzeros, scales = (t[f"{base}.{s}"] for s in ("qweight", "qzeros", "scales"))
    k, n = qweight.shape[0], qweight.shape[1] * 8
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    slot = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])[nn % 8]  # column c sits in nibble slot[c % 8]
    q = _nibble(qweight[kk, nn // 8], slot)
    z = _nibble(qzeros[kk // group, nn // 8], slot)
    return ((q - z) * scales.float()[kk // group, nn]).t()


def _compressed_tensors_dense(t: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(config)
    scheme = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(str(scheme.format or qc.format))
    out, modules = {}, {n.rsplit(".", 1)[0] for n in t if n.endswith(".weight_scale")}
    for base in modules:
        local = {n.rsplit(".", 1)[1]: v for n, v in t.items() if n.rsplit(".", 1)[0] == base}
        out[f"{base}.weight"] = compressor.decompress(local, scheme)["weight"]
    return out


def dequantized(src: Path, dst: Path) -> Path:
    """A float32 dense copy of a quantized checkpoint directory (GPTQ, AWQ, HF fp8, compressed-tensors)."""
    config = json.loads((src / "config.json").read_text())["quantization_config"]
    t = load_file(str(src / "model.safetensors"))
    method = config["quant_method"]
    dense: dict[str, torch.Tensor] = {}
    if method == "compressed-tensors":
        dense = _compressed_tensors_dense(t, config)
    for name in t:
        base, _, last = name.rpartition(".")
        if method == "gptq" and last == "qweight":
            dense[f"{base}.weight"] = _gptq_dense(
                t, base, 1 if config.get("checkpoint_format", "gptq") == "gptq" else 0
            )
        elif method == "awq" and last == "qweight":
            dense[f"{base}.weight"] = _awq_dense(t, base, config["group_size"])
        elif method == "fp8" and last == "weight_scale_inv":
            w, s = t[f"{base}.weight"].float(), t[name].float()
            s = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            dense[f"{base}.weight"] = w * s
    for name, value in t.items():
        base = name.rpartition(".")[0]
        if f"{base}.weight" not in dense and f"{base}.weight_scale" not in t and f"{base}.weight_scale_inv" not in t \
                and not name.endswith(("qweight", "qzeros", "scales", "g_idx")):  # fmt: skip
            dense[name] = value
    return _finish(src, dst, {k: v.float() for k, v in dense.items()}, None)
