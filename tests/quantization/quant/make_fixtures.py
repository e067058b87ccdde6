"""Regenerate the tiny quantized checkpoints in ``fixtures/`` with the real llm-compressor.

llm-compressor pins an older transformers than kvik's tests use, so it runs in its own
virtual environment and its outputs are committed (config.json + model.safetensors;
the tests add kvik's tiny tokenizer)::

    python -m venv --system-site-packages /tmp/llmc && /tmp/llmc/bin/pip install "llmcompressor==0.14.0.1"
    /tmp/llmc/bin/python tests/quantization/quant/make_fixtures.py

Made with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures"
sys.path.insert(0, str(HERE.parents[2] / "core"))

# Big enough for 128x128 FP8 blocks and 128-wide INT4 groups; small enough to commit (bf16, ~1 MB each).
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def dense_model(seed: int = 0):  # type: ignore[no-untyped-def]
    from kvik.testing.tiny_models import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config("llama", **SHAPE)).eval()
    with torch.no_grad():  # wide weights, as kvik's tiny models: greedy decoding is not a coin toss
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    return model.to(torch.bfloat16)


def calibration(n: int = 16, length: int = 48):  # type: ignore[no-untyped-def]
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (n, length), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n})


def _build(name: str, recipe: object, calibrate: bool) -> None:
    import tempfile

    from kvik.testing.tiny_models import build_tokenizer
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    dense_dir = Path(tempfile.mkdtemp()) / "dense"
    dense_model().save_pretrained(dense_dir)
    build_tokenizer(SHAPE["vocab_size"]).save_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
    kwargs = {"dataset": calibration(), "num_calibration_samples": 16, "max_seq_length": 48} if calibrate else {}
    oneshot(model=model, recipe=recipe, **kwargs)
    path = OUT / name
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, save_compressed=True)
    for extra in path.iterdir():  # keep the two files the tests need
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    config = json.loads((path / "config.json").read_text())
    print(name, json.dumps(config["quantization_config"])[:300])


def main() -> None:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    OUT.mkdir(exist_ok=True)
    only = set(sys.argv[1:])  # names to rebuild; all when none given
    build = _only(only)
    build("ct_int8_w8a8", QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]), False)
    build("ct_fp8_dynamic", QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]), False)
    build("ct_fp8_static", QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"]), True)
    build("ct_fp8_block", QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=["lm_head"]), False)
    build("ct_w4a16_g128", GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]), True)
    build("ct_w4a16_asym_g128", GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"]), True)
    # FP8 weights plus a calibrated FP8 KV cache: per-layer self_attn.k_scale / v_scale tensors.
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    build("ct_fp8_kv", QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"],
                                            kv_cache_scheme=kv_scheme), True)  # fmt: skip


def _only(names: set[str]):  # type: ignore[no-untyped-def]
    def maybe(name: str, recipe: object, calibrate: bool) -> None:
        if not names or name in names:
            _build(name, recipe, calibrate)

    return maybe


if __name__ == "__main__":
    main()
