"""Convert a dense safetensors checkpoint directory to the example_int8 format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kvik_example_int8.method import quantize_int8


def is_linear_weight(name: str) -> bool:
    """The weights kvik's Llama-family models load through ``Linear`` (so through the quant method).

    Embeddings, norms and ``lm_head`` stay dense: kvik builds those as other modules.
    """
    return name.endswith("_proj.weight")


def quantize_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write ``src_dir`` (config.json + *.safetensors + tokenizer) to ``dst_dir`` with int8 linear weights.

    Each ``X.weight`` of a linear layer becomes int8 ``X.weight`` plus float32
    ``X.weight_scale`` ``[out]``; config.json gains
    ``"quantization_config": {"quant_method": "example_int8"}``. Returns ``dst_dir``.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config']}); start from dense weights")
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, value in load_file(str(file)).items():
            if is_linear_weight(name):
                tensors[name], tensors[f"{name}_scale"] = quantize_int8(value)
            else:
                tensors[name] = value.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "example_int8"}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    # Tokenizer and generation files travel unchanged; the weight index does not (one file now).
    for file in src.iterdir():
        if (
            file.is_file()
            and file.suffix != ".safetensors"
            and file.name not in ("config.json", "model.safetensors.index.json")
        ):
            shutil.copy2(file, dst / file.name)
    return dst
