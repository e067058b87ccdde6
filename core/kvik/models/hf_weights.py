"""Loading Hugging Face-named weights into a built kvik model (shared by every native architecture).

Checkpoint names are first passed through the architecture's ``sanitize``; then
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` go to shards of the
merged ``qkv_proj`` / ``gate_up_proj`` :class:`~kvik.layers.linear.Linear` (a
checkpoint that ships the merged tensor, like Phi-3's, loads it whole), a module
with a ``load_checkpoint_weight`` method (MoE experts) loads the names under it
itself, FP8 KV-cache scales go to the layer's attention backend (:mod:`kvik.models.kv_scales`),
and everything else is copied into the parameter of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvik.distributed.sharding import materialize
from kvik.layers.linear import Linear
from kvik.models.kv_scales import attribute_backend, load_kv_scale

# HF projection name -> (our merged module, shard index)
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


# The mixin's methods use nn.Module's; typing it as one keeps mypy honest without
# putting a second nn.Module base in the model classes' MRO at run time.
_Base = nn.Module if TYPE_CHECKING else object


class HFWeightLoader(_Base):  # type: ignore[misc,valid-type]
    """Mixin for a model ``nn.Module`` with ``lm_head`` (an LMHead) and ``_loaded: set[str]``."""

    _loaded: set[str]
    lm_head: Any

    @classmethod
    def sanitize(cls, name: str) -> str:
        """A checkpoint weight name -> the name of our parameter (mlx-lm style; identity here)."""
        return name

    def holds_weight(self, name: str) -> bool:
        """Whether this model instance holds (sanitized) weight ``name``; False skips it unread
        (a pipeline stage's other layers). Every weight, unless a model splits itself."""
        return True

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        consumed: set[str] = set()
        unknown: list[str] = []
        for original, value in weights:
            name = self.sanitize(original)
            if not self.holds_weight(name):
                consumed.add(original)
                continue
            if name == "lm_head.weight" and self.lm_head.tied:
                # A quantized format may offer the tied rows packed (the embedding got them dense).
                if not isinstance(value, torch.Tensor):
                    self.lm_head.load_packed(value)
                consumed.add(original)
                continue
            if name.endswith("rotary_emb.inv_freq"):
                consumed.add(original)
                continue
            if load_kv_scale(name, value, lambda path: attribute_backend(self, path)):
                consumed.add(original)
                continue
            try:
                loaded = self._load_one(name, value)
            except ValueError as exc:
                if name == original:
                    raise
                raise ValueError(f"checkpoint tensor {original} (loaded as {name}): {exc}") from exc
            if loaded:
                consumed.add(original)
            else:
                unknown.append(original)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ValueError(
                f"checkpoint has weights {type(self).__name__} does not know: {shown}. "
                "Is the checkpoint's architecture right for these weights?"
            )
        return consumed

    def _load_one(self, name: str, value: Any) -> bool:
        custom = _custom_loader(self, name)
        if custom is not None:  # a module that maps its own checkpoint names (MoE experts)
            module, rest = custom
            return bool(module.load_checkpoint_weight(rest, value, name))
        prefix, _, param = name.rpartition(".")
        owner, _, proj = prefix.rpartition(".")
        shard: int | None = None
        if proj in _MERGED:
            merged, shard = _MERGED[proj]
            prefix = f"{owner}.{merged}"
        try:
            module = self.get_submodule(prefix)
        except AttributeError:
            return False
        if isinstance(module, Linear):
            try:
                module.load(param, value, shard)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"cannot load {name}: {exc}") from exc
            if shard is not None:
                self._loaded.add(f"{prefix}[{shard}]")
            elif len(module.output_sizes) > 1:  # a checkpoint that ships the merged tensor (Phi-3's qkv_proj)
                self._loaded.update(f"{prefix}[{i}]" for i in range(len(module.output_sizes)))
            else:
                self._loaded.add(prefix)
            return True
        target = module._parameters.get(param)
        if target is None:
            return False
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        if target.is_meta and getattr(module, "packed_rows", None) is not None:
            # An embedding whose lookups the packed tied head serves (VocabEmbedding.look_up_from): nothing to hold.
            self._loaded.add(f"{prefix}.{param}")
            return True
        fill = getattr(value, "dequantize_into", None)
        if callable(fill):
            # A quantized format's blocks for a dense parameter (a GGUF token embedding): decoded straight into
            # it, in its dtype, instead of the whole tensor in float32 first.
            fill(target.data)
        else:
            value = materialize(value)  # a lazily read checkpoint tensor (tensor parallelism's loading)
            # copy_ converts the dtype itself: a .to() first held a second full-size copy (a float32 value into a
            # bfloat16 parameter). Across devices the value is converted on its own device, so fewer bytes travel.
            target.data.copy_(value if value.device == target.device else value.to(target.dtype))
        self._loaded.add(f"{prefix}.{param}")
        return True

    def missing_weights(self) -> list[str]:
        """Parameters no checkpoint value reached (call after load_weights)."""
        missing: list[str] = []
        for path, module in self.named_modules():
            own = getattr(module, "missing_checkpoint_weights", None)
            if callable(own):  # a module that tracks its own loading (MoE experts)
                missing.extend(f"{path}.{m}" for m in own())
            elif isinstance(module, Linear):
                n = len(module.output_sizes)
                missing.extend(
                    s for s in ([f"{path}[{i}]" for i in range(n)] if n > 1 else [path]) if s not in self._loaded
                )
            else:
                missing.extend(f"{path}.{p}" for p in module._parameters if f"{path}.{p}" not in self._loaded)
        return missing


def _custom_loader(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """The innermost module on ``name``'s path that loads its own weights, with the rest of the name."""
    parts = name.split(".")
    module: Any = model
    for i, part in enumerate(parts[:-1]):
        module = getattr(module, "_modules", {}).get(part)
        if module is None:
            return None
        if callable(getattr(module, "load_checkpoint_weight", None)) and parts[i + 1] not in module._modules:
            return module, ".".join(parts[i + 1 :])
    return None
