"""Which architecture names are pooling models (torch-free: read at registration and config time)."""

from __future__ import annotations

from typing import Any

# Families whose decoder kvik runs natively (kvik.models.pooling_models builds their pooling variants).
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")

DECODER_POOLING_ARCHITECTURES = tuple(
    f"{family}{suffix}" for family in FAMILIES for suffix in ("Model", "ForSequenceClassification")
)

# Bidirectional encoders (kvik.models.bert, kvik.models.modernbert): each request is one full forward,
# no paged KV cache.
ENCODER_FAMILIES = ("Bert", "Roberta", "XLMRoberta", "ModernBert")
ENCODER_ARCHITECTURES = tuple(
    f"{family}{suffix}" for family in ENCODER_FAMILIES for suffix in ("Model", "ForSequenceClassification")
)

POOLING_ARCHITECTURES = DECODER_POOLING_ARCHITECTURES + ENCODER_ARCHITECTURES


def is_pooling_architecture(arch: str) -> bool:
    return arch in POOLING_ARCHITECTURES


def is_encoder_architecture(arch: str) -> bool:
    """A bidirectional encoder: every token attends to the whole prompt, so a prompt runs in one step."""
    return arch in ENCODER_ARCHITECTURES


def is_classifier_architecture(arch: str) -> bool:
    return arch.endswith("ForSequenceClassification")


def pooling_architecture(arch: str) -> str | None:
    """The pooling body to build a ``*ForCausalLM`` checkpoint as under ``runner="pooling"`` (None: none)."""
    family = arch.removesuffix("ForCausalLM")
    return f"{family}Model" if family != arch and family in FAMILIES else None


def position_offset(hf_config: Any) -> int:
    """Position embeddings a (XLM-)RoBERTa model never uses for tokens: its positions start after
    ``padding_idx`` (``pad_token_id``), so ``max_position_embeddings - offset`` tokens fit; 0 elsewhere."""
    if getattr(hf_config, "model_type", "") in ("roberta", "xlm-roberta"):
        return int(getattr(hf_config, "pad_token_id", 1) or 0) + 1
    return 0
