"""Multi-LoRA serving: many PEFT adapters over one base model, batched in one step.

``LoRARequest`` (vLLM's name and fields) selects an adapter per request;
:mod:`kvik.lora.adapter` reads and checks PEFT checkpoints, :mod:`kvik.lora.layers`
wraps a built model's projections with per-slot adapter weights, and
:mod:`kvik.lora.slots` keeps the slots filled (LRU, from a CPU cache and disk).
See docs/lora.md.
"""

from __future__ import annotations

from kvik.lora.request import LoRARequest

__all__ = ["LoRARequest"]
