"""Choosing the platform: forced by the user, or the best available one."""

from __future__ import annotations

import logging
import os

from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.plugins.registry import PluginError
from kvik.platforms.interface import Platform

logger = logging.getLogger(__name__)
ENV_DEVICE = "KVIK_DEVICE"


def _lookup(manager: PluginManager, name: str) -> type[Platform]:
    registry = manager.platforms
    if name in registry or name in registry.conflicts:
        return registry.get(name)  # type: ignore[no-any-return]
    for entry in registry.entries():
        cls = entry.load()
        if name in getattr(cls, "aliases", ()):
            return cls  # type: ignore[no-any-return]
    return registry.get(name)  # type: ignore[no-any-return]  # raises, listing names


def resolve_platform(device: str | None = None, manager: PluginManager | None = None) -> Platform:
    """Return the platform for ``device`` (or ``$KVIK_DEVICE``, or auto).

    A platform the user named that is unavailable or broken is a hard error,
    never a silent fallback. Auto-selection skips broken platforms with a
    warning and picks the highest ``priority`` among available ones.
    """
    manager = manager or get_plugin_manager()
    requested = device or os.environ.get(ENV_DEVICE) or "auto"
    if requested != "auto":
        cls = _lookup(manager, requested)
        if not cls.is_available():
            reason = cls.unavailable_reason() or "its hardware or runtime was not found"
            raise PluginError(f"platform {requested!r} is not available on this machine: {reason}")
        return cls()
    candidates: list[type[Platform]] = []
    for entry in manager.platforms.entries():
        try:
            cls = entry.load()
            if cls.is_available():
                candidates.append(cls)
        except Exception as exc:
            logger.warning("skipping platform %r from %s: %s", entry.name, entry.source, exc)
    if not candidates:
        names = ", ".join(manager.platforms.names()) or "none installed"
        raise PluginError(
            f"no available platform (registered: {names}); install one, e.g. pip install 'kvik[cpu]'"
        )
    best = max(candidates, key=lambda c: c.priority)
    return best()
