"""Choosing the platform: forced by the user, or the best available one."""

from __future__ import annotations

import logging
import os

from kvik.platforms.interface import Platform
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.plugins.registry import Entry, PluginError

logger = logging.getLogger(__name__)
ENV_DEVICE = "KVIK_DEVICE"


def _load_class(entry: Entry) -> type[Platform]:
    """Import a platform entry; PluginError if it is not a Platform subclass."""
    cls = entry.load()
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise PluginError(
            f"platform {entry.name!r} from {entry.source} points to {entry.target}, "
            "which is not a subclass of kvik.platforms.Platform"
        )
    return cls


def _lookup(manager: PluginManager, name: str) -> type[Platform]:
    registry = manager.platforms
    if name in registry or name in registry.conflicts:
        return _load_class(registry.entry(name))  # raises naming both plugins on a conflict
    for entry in registry.entries():
        try:
            cls = _load_class(entry)
        except PluginError as exc:  # a broken platform must not hide the one the user asked for
            logger.debug("while looking for alias %r: %s", name, exc)
            continue
        if name in getattr(cls, "aliases", ()):
            return cls
    registry.entry(name)  # raises: unknown platform, listing the registered names
    raise AssertionError("unreachable")


def _probe(cls: type[Platform]) -> bool:
    available = cls.is_available()
    if not isinstance(available, bool):
        raise PluginError(f"{cls.__name__}.is_available() returned {available!r}, not a bool")
    return available


def resolve_platform(device: str | None = None, manager: PluginManager | None = None) -> Platform:
    """Return the platform for ``device`` (or ``$KVIK_DEVICE``, or auto).

    A platform the user named that is unavailable or broken is a hard error,
    never a silent fallback. Auto-selection skips broken platforms with a
    warning and picks the highest ``priority`` among available ones (ties:
    the first name in alphabetical order).
    """
    manager = manager or get_plugin_manager()
    requested = (device or os.environ.get(ENV_DEVICE) or "auto").strip().lower()
    if requested != "auto":
        source = "device=" if device else f"${ENV_DEVICE}="
        cls = _lookup(manager, requested)
        try:
            available = _probe(cls)
        except Exception as exc:
            raise PluginError(
                f"platform {requested!r} ({source}{requested}) failed its availability check: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not available:
            reason = cls.unavailable_reason() or "its hardware or runtime was not found"
            raise PluginError(
                f"platform {requested!r} ({source}{requested}) is not available on this machine: {reason}. "
                "kvik does not fall back to another platform when one is named; "
                "use device='auto' to pick the best available one."
            )
        return cls()
    candidates: list[type[Platform]] = []
    for entry in manager.platforms.entries():
        try:
            cls = _load_class(entry)
            if _probe(cls):
                candidates.append(cls)
        except Exception as exc:
            logger.warning("skipping platform %r from %s: %s: %s", entry.name, entry.source, type(exc).__name__, exc)
    if not candidates:
        names = ", ".join(manager.platforms.names()) or "none installed"
        raise PluginError(f"no available platform (registered: {names}); install one, e.g. pip install kvik-cpu")
    best = max(candidates, key=lambda c: c.priority)  # max() keeps the first of equal priorities
    logger.info(
        "selected platform %r (priority %d) among available: %s",
        best.name,
        best.priority,
        ", ".join(c.name for c in candidates),
    )
    return best()
