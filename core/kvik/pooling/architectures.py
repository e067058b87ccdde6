"""Which architecture names are pooling models (torch-free: read at registration and config time)."""

from __future__ import annotations

# Families whose decoder kvik runs natively (kvik.models.pooling_models builds their pooling variants).
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")

POOLING_ARCHITECTURES = tuple(
    f"{family}{suffix}" for family in FAMILIES for suffix in ("Model", "ForSequenceClassification")
)


def is_pooling_architecture(arch: str) -> bool:
    return arch in POOLING_ARCHITECTURES


def is_classifier_architecture(arch: str) -> bool:
    return arch.endswith("ForSequenceClassification")


def pooling_architecture(arch: str) -> str | None:
    """The pooling body to build a ``*ForCausalLM`` checkpoint as under ``runner="pooling"`` (None: none)."""
    family = arch.removesuffix("ForCausalLM")
    return f"{family}Model" if family != arch and family in FAMILIES else None
