"""Choosing the attention backend for a model on a platform."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvik.attention.backend import AttentionBackend
from kvik.config import resolve_kv_cache_dtype
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.plugins.registry import PluginError

if TYPE_CHECKING:
    from kvik.config import ResolvedConfig
    from kvik.platforms.interface import Platform


def select_attention_backend(
    platform: Platform,
    config: ResolvedConfig,
    head_size: int,
    dtype: str,
    sliding_window: int | None,
    manager: PluginManager | None = None,
    *,
    logits_soft_cap: float | None = None,
) -> type[AttentionBackend[Any]]:
    """The user's ``config.attention_backend`` if set, else the platform's first valid preference.

    A backend the user named that cannot run the configuration is a hard error
    listing its reasons; when no preferred backend fits, the error lists every
    candidate's reasons. ``logits_soft_cap`` (the model's attention soft-cap) refuses
    backends without ``supports_logits_soft_cap``.
    """
    manager = manager or get_plugin_manager()
    block_size = config.block_size
    kwargs: dict[str, Any] = dict(
        head_size=head_size,
        dtype=dtype,
        device_type=platform.device_type,
        block_size=block_size,
        sliding_window=sliding_window,
    )

    kv_cache_dtype = resolve_kv_cache_dtype(getattr(config, "kv_cache_dtype", "auto"))  # "fp8" -> "fp8_e4m3"

    def refuse(cls: type[AttentionBackend[Any]]) -> list[str]:
        reasons = cls.validate(**kwargs)
        if kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            held = [d for d in cls.supported_kv_cache_dtypes if d != "auto"]
            reasons.append(
                f"kv_cache_dtype={kv_cache_dtype!r} is not supported (its cache holds the model dtype"
                + (f" or {', '.join(held)}" if held else " only") + "); use kv_cache_dtype='auto'"
            )
        if logits_soft_cap is not None and not cls.supports_logits_soft_cap:
            reasons.append(f"attention logit soft-capping (attn_logit_softcapping={logits_soft_cap}) is not supported")
        if getattr(config, "deterministic", False) and not cls.supports_batch_invariance:
            reasons.append("it has no batch-invariant mode, which deterministic=True needs")
        return reasons

    if config.attention_backend:
        cls: type[AttentionBackend[Any]] = manager.attention_backends.get(config.attention_backend)
        reasons = refuse(cls)
        if reasons:
            raise ValueError(
                f"attention backend {config.attention_backend!r} cannot run this model on platform "
                f"{platform.name!r}: {'; '.join(reasons)}. Leave attention_backend unset to pick one automatically "
                f"(this platform prefers {', '.join(platform.attention_backends)})."
            )
        return cls
    problems: list[str] = []
    for name in platform.attention_backends:
        try:
            cls = manager.attention_backends.get(name)
        except PluginError as exc:
            problems.append(f"{name}: {exc}")
            continue
        reasons = refuse(cls)
        if not reasons:
            return cls
        problems.append(f"{name}: {'; '.join(reasons)}")
    detail = "\n  ".join(problems) or "the platform lists no attention backends"
    if kv_cache_dtype != "auto":
        holders = [n for n in manager.attention_backends.names() if _holds(manager, n, kv_cache_dtype)]
        detail += (
            f"\n  (kv_cache_dtype={kv_cache_dtype!r} is held by the attention backends "
            f"{', '.join(holders) or 'none registered'}; use a platform that runs one of them, or kv_cache_dtype='auto')"
        )
    raise ValueError(
        f"no attention backend of platform {platform.name!r} can run head size {head_size}, dtype {dtype}, "
        f"block size {block_size}, sliding window {sliding_window}:\n  {detail}"
    )


def _holds(manager: PluginManager, name: str, kv_cache_dtype: str) -> bool:
    try:
        return kv_cache_dtype in manager.attention_backends.get(name).supported_kv_cache_dtypes
    except PluginError:
        return False
