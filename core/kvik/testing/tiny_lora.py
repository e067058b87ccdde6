"""Random LoRA adapters in PEFT's on-disk format, for tests and benchmarks.

:func:`make_peft_adapter` builds one with the ``peft`` package over a checkpoint
(the tests compare kvik with PEFT's merged model); :func:`write_random_adapter`
writes the same files from shapes alone, without ``peft`` or base weights
(benchmarks on machines without it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def make_peft_adapter(
    base_dir: str | Path,
    path: str | Path,
    targets: Sequence[str],
    rank: int,
    alpha: int,
    seed: int = 0,
    use_rslora: bool = False,
    std: float = 0.1,
) -> Path:
    """Save a PEFT LoRA adapter over ``base_dir`` with random A and (non-zero) B of std ``std``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(str(path))
    return Path(path)


def merged_checkpoint(base_dir: str | Path, adapter_dir: str | Path, path: str | Path) -> Path:
    """PEFT's merge of an adapter into its base, saved with the base's tokenizer (the reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(path), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(str(path))
    return Path(path)


def llama_module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-adaptable projection of a Llama-shaped layer, by PEFT leaf name."""
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    inter = int(hf_config.intermediate_size)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_random_adapter(
    path: str | Path,
    hf_config: Any,
    rank: int,
    targets: Sequence[str] = ATTENTION + MLP,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.02,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random PEFT LoRA adapter for a Llama-shaped ``hf_config`` (no peft, no base weights)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = llama_module_shapes(hf_config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(hf_config.num_hidden_layers)):
        for leaf in targets:
            part = "self_attn" if leaf in ATTENTION else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{leaf}"
            in_f, out_f = shapes[leaf]
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=generator) * std).to(
                getattr(torch, dtype)
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=generator) * std).to(
                getattr(torch, dtype)
            )
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": list(targets),
              "bias": "none", "modules_to_save": None, "use_rslora": False, "use_dora": False}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
