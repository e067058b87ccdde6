"""Shared by the LoRA tests: a tiny random Llama, three PEFT adapters of different ranks and targets, and PEFT's merged references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvik.lora import LoRARequest
from kvik.testing.reference import hf_greedy, random_prompts
from kvik.testing.tiny_lora import ATTENTION, MLP, make_peft_adapter, merged_checkpoint
from kvik.testing.tiny_models import make_tiny_model

MAX_NEW = 8
# name, targets, rank, alpha, rsLoRA
ADAPTERS = (
    ("qv", ("q_proj", "v_proj"), 4, 8, False),
    ("all", ATTENTION + MLP, 8, 16, True),
    ("mlp_o", ("o_proj", "gate_proj", "down_proj"), 2, 4, False),
)


@dataclass
class LoRAWorld:
    base: Path
    loras: list[LoRARequest]
    prompts: list[list[int]]
    base_tokens: list[list[int]]  # HF greedy of the base, per prompt
    lora_tokens: list[list[list[int]]]  # [adapter][prompt]: HF greedy of PEFT's merged model


def build_world(root: Path) -> LoRAWorld:
    base = make_tiny_model(root / "base")
    prompts = random_prompts(3, seed=5, low=5, high=24)
    loras, lora_tokens = [], []
    for i, (name, targets, rank, alpha, rslora) in enumerate(ADAPTERS):
        adapter = make_peft_adapter(base, root / name, targets, rank, alpha, seed=i + 1, use_rslora=rslora)
        merged = merged_checkpoint(base, adapter, root / f"{name}-merged")
        loras.append(LoRARequest(name, i + 1, str(adapter)))
        lora_tokens.append(hf_greedy(merged, prompts, MAX_NEW))
    return LoRAWorld(base, loras, prompts, hf_greedy(base, prompts, MAX_NEW), lora_tokens)
