"""Rope settings read from a Hugging Face config (no torch: config resolution uses them).

Supported ``rope_type`` values: ``default``, ``linear``, ``llama3``, ``dynamic``, ``yarn`` and
``longrope`` (Phi-3's LongRoPE, also spelled ``su``).
Settings are read from ``config.rope_parameters`` (transformers >= 5) or from the
older ``rope_theta`` / ``rope_scaling`` attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


@dataclass(slots=True)
class RopeSettings:
    """The rope settings of one model, normalised across transformers versions."""

    rope_type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # factor, low_freq_factor, ...


_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_settings(hf_config: Any, layer_type: str = "full_attention") -> RopeSettings:
    """Read rope settings from a ``transformers`` config of any supported version.

    Models whose local and global layers rotate differently (Gemma 3) keep one
    parameter set per layer type in ``rope_parameters``; ``layer_type`` picks it.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        params = getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    if any(key in params for key in _LAYER_TYPES):
        params = dict(params.get(layer_type) or params.get("full_attention") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "su":  # LongRoPE's name in early Phi-3 configs
        rope_type = "longrope"
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if not params.get(key):
                raise ValueError(f"longrope scaling needs rope_scaling.{key} (a list of per-frequency factors)")
        original = params.get("original_max_position_embeddings") or getattr(
            hf_config, "original_max_position_embeddings", None
        )
        if not original:
            raise ValueError("longrope scaling needs original_max_position_embeddings in the model config")
        params["original_max_position_embeddings"] = int(original)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} (from the model's rope_parameters/rope_scaling) is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    partial = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return RopeSettings(rope_type=rope_type, theta=float(theta), partial_rotary_factor=float(partial), params=params)


def rope_max_len(hf_config: Any) -> int:
    """The longest context the model's positions support.

    ``linear`` and ``dynamic`` scaling stretch ``max_position_embeddings`` by
    ``factor``; ``llama3`` configs already state the extended length.
    """
    max_pos = int(hf_config.max_position_embeddings)
    rope = rope_settings(hf_config)
    factor = float(rope.params.get("factor") or 1.0)
    if rope.rope_type in ("linear", "dynamic"):
        return int(max_pos * factor)
    if rope.rope_type == "yarn":  # Qwen2.5-style configs keep the trained length in max_position_embeddings
        return max(max_pos, int(int(rope.params.get("original_max_position_embeddings") or max_pos) * factor))
    return max_pos
