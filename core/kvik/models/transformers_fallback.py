"""Any causal LM transformers can build, run through its own modelling code on kvik's paged KV cache.

For an architecture with no native kvik implementation, the model is built by
``AutoModelForCausalLM.from_config`` and its attention layers are pointed at an
attention function registered with transformers (``AttentionInterface``): each
call hands the layer's query/key/value to one of kvik's attention backends,
which writes the new keys and values into the paged cache and attends through
the block tables. Everything above the model (scheduler, continuous batching,
prefix caching, the server) works unchanged.

The step's flattened tokens go through transformers as one sequence
(``[1, num_tokens]``) with kvik's positions as ``position_ids``, so rotary and
learned position embeddings see each token's true position; the attention
mask transformers would build is skipped (the backend applies causality per
request). Logit post-processing that transformers does in its LM head
(``logits_scaling``, ``logit_scale``, ``final_logit_softcapping``) is applied
in :meth:`compute_logits`.

Not supported here (clear errors at build time): quantized checkpoints,
attention logit soft-capping, and models whose attention layers do not go
through transformers' attention interface.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.models.interface import ModelBuildContext
from kvik.models.kv_scales import load_kv_scale
from kvik.models.model_config import as_transformers_config

ATTENTION_NAME = "kvik_paged"  # the attn_implementation name registered with transformers

# The step being run: (model, kv caches, metadata). Set around the transformers forward.
_STEP: contextvars.ContextVar[tuple[TransformersForCausalLM, list[torch.Tensor], AttentionMetadata]] = (
    contextvars.ContextVar("kvik_transformers_step")
)
_registered = False


def _paged_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, computed by the layer's kvik backend."""
    model, kv_caches, metadata = _STEP.get()
    index = model.layer_of[id(module)]
    backend = model.attention[index]
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the transformers fallback")
    q = query[0].transpose(0, 1).contiguous()  # [tokens, heads, head_dim]
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    out = backend.forward(q, k, v, kv_caches[index], metadata)  # [tokens, heads, head_dim]
    return out[None], None  # [1, tokens, heads, head_dim], as transformers' sdpa returns it


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the backend masks per request; transformers must not build a [T, T] mask


def register_attention() -> None:
    """Register kvik's paged attention (and a no-op mask) with transformers, once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    _registered = True


class TransformersForCausalLM(nn.Module):
    """transformers' modelling code over kvik's paged attention (see the module docstring)."""

    def __init__(self, ctx: ModelBuildContext) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        if ctx.quant_method is not None:
            raise ValueError("the transformers fallback runs dense checkpoints only; this one is quantized")
        register_attention()
        hf_config = copy.deepcopy(as_transformers_config(ctx.model_config.hf_config))
        hf_config._attn_implementation = ATTENTION_NAME
        with torch.device(ctx.device):
            self.hf = AutoModelForCausalLM.from_config(hf_config, dtype=ctx.dtype)
        self.hf.eval()
        self.hf.requires_grad_(False)
        layers = sorted(
            (m for m in self.hf.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")),
            key=lambda m: m.layer_idx,
        )
        if len(layers) != ctx.model_config.num_layers:
            raise ValueError(
                f"{type(self.hf).__name__}: found {len(layers)} attention layers using transformers' attention "
                f"interface, expected {ctx.model_config.num_layers}; this model cannot run through the fallback"
            )
        mc = ctx.model_config
        self.layer_of = {id(m): i for i, m in enumerate(layers)}
        self.attention: list[AttentionBackend] = []
        for m in layers:
            window = getattr(m, "sliding_window", None)
            self.attention.append(
                ctx.make_attention(mc.num_heads, mc.head_dim, mc.num_kv_heads, float(m.scaling), window or None)
            )
        self._loaded: set[str] = set()
        self._logit_scale = 1.0 / float(getattr(hf_config, "logits_scaling", 1.0) or 1.0)  # Granite
        self._logit_scale *= float(getattr(hf_config, "logit_scale", 1.0) or 1.0)  # Cohere
        self._softcap = getattr(hf_config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        token = _STEP.set((self, kv_caches, metadata))
        try:
            out = self.hf.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _STEP.reset(token)
        return out.last_hidden_state[0]  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden).float()
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits  # type: ignore[no-any-return]

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        state = dict(self.hf.named_parameters(remove_duplicate=False))  # tied weights under every name
        state.update(self.hf.named_buffers(remove_duplicate=False))
        rename = _checkpoint_renamer(self.hf)
        unknown: list[str] = []
        for stored_name, value in weights:
            name = rename(stored_name)
            target = state.get(name)
            if target is None and load_kv_scale(name, value, self._attention_at):  # FP8 KV-cache scales
                continue
            if target is None:
                unknown.append(name)
                continue
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
            self._loaded.add(name)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise ValueError(f"checkpoint has weights {type(self.hf).__name__} does not have: {shown}")
        self.hf.tie_weights()
        return set(self._loaded)

    def _attention_at(self, path: str) -> AttentionBackend | None:
        """kvik's attention backend for the transformers attention module at ``path``, if it is one."""
        try:
            module = self.hf.get_submodule(path)
        except AttributeError:
            return None
        index = self.layer_of.get(id(module))
        return None if index is None else self.attention[index]

    def missing_weights(self) -> list[str]:
        """Parameters no checkpoint tensor reached (tied ones share a loaded parameter and are not listed)."""
        aliases: dict[int, list[str]] = {}
        for name, param in self.hf.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        return [names[0] for names in aliases.values() if not self._loaded.intersection(names)]


def _checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint tensor name -> the built model's name, by transformers' own renaming rules.

    transformers 5 keeps older checkpoints loadable by renaming their tensors at
    load time (e.g. GPT-NeoX's ``embed_out`` is ``lm_head`` in the module tree).
    Plain renames are applied here; a checkpoint that needs a tensor conversion
    (splitting or stacking tensors) is refused with its name.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers without conversion mappings stores names as built
        return lambda name: name
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]

    def rename(name: str) -> str:
        for transform in transforms:
            renamed, matched = transform.rename_source_key(name)
            if matched is None:
                continue
            if type(transform) is not WeightRenaming:
                raise ValueError(
                    f"checkpoint tensor {name} needs transformers' {type(transform).__name__} conversion, which the "
                    "transformers fallback does not apply; this architecture needs a native kvik implementation"
                )
            name = renamed
        return name

    return rename
