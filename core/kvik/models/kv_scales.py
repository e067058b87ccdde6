"""FP8 KV-cache scales stored in checkpoints, loaded into each layer's attention backend.

Names the writers use (per attention layer ``P = model.layers.N.self_attn``):

- ``P.k_scale`` / ``P.v_scale``: compressed-tensors / llm-compressor ``kv_cache_scheme``
  checkpoints (and vLLM's own layout);
- ``P.k_proj.k_scale`` / ``P.v_proj.v_scale``: NVIDIA ModelOpt;
- ``P.k_proj.output_scale`` / ``P.v_proj.output_scale``: older compressed-tensors;
- ``P.kv_scale``: the deprecated single scale (AutoFP8), used for both K and V.

A scale means: stored value = x / scale. A per-head scale vector is reduced to its
maximum, the one per-layer scale under which no head's values overflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvik.attention.backend import AttentionBackend

# checkpoint name suffix -> (suffix of the attention module's prefix to strip, scales it sets)
_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (".k_proj.k_scale", ("k",)),
    (".v_proj.v_scale", ("v",)),
    (".k_proj.output_scale", ("k",)),
    (".v_proj.output_scale", ("v",)),
    (".k_scale", ("k",)),
    (".v_scale", ("v",)),
    (".kv_scale", ("k", "v")),
)


def kv_scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(attention module path, ("k",) / ("v",) / ("k", "v")) for a KV-scale tensor name, else None."""
    for suffix, which in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], which
    return None


def load_kv_scale(name: str, value: Any, find_backend: Callable[[str], AttentionBackend[Any] | None]) -> bool:
    """Set the scale(s) ``name`` holds on the attention backend ``find_backend`` returns for its module path.

    False when ``name`` is no KV-scale name, or ``find_backend`` finds no backend there
    (the caller then reports it as an unknown weight).
    """
    target = kv_scale_target(name)
    if target is None:
        return False
    path, which = target
    backend = find_backend(path)
    if backend is None:
        return False
    scale = float(value.float().max()) if hasattr(value, "float") else float(value)
    for w in which:
        backend.set_kv_scale(w, scale)
    return True


def attribute_backend(model: Any, path: str) -> AttentionBackend[Any] | None:
    """The ``attn`` backend of the module at ``path`` (kvik's native attention blocks keep it there)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    backend = getattr(module, "attn", None)
    return backend if isinstance(backend, AttentionBackend) else None
