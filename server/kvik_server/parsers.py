"""Looking up tool and reasoning parsers by name (built-ins plus plugins' ``kvik_register_*_parsers``)."""

from __future__ import annotations

from typing import Any

from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.plugins.registry import PluginError, Registry

import kvik_server.plugin as builtin_parsers

KINDS = ("tool parser", "reasoning parser")


def parser_registry(kind: str, manager: PluginManager | None = None) -> Registry[Any]:
    """The registry of ``kind`` ("tool parser" or "reasoning parser"), built-ins included."""
    if kind not in KINDS:
        raise ValueError(f"unknown parser kind {kind!r}; expected one of {', '.join(KINDS)}")
    manager = manager or get_plugin_manager()
    # kvik-server's entry point ("server") normally loaded them; a source checkout whose metadata
    # predates it, or a test's fresh manager, gets them here, unless KVIK_PLUGINS /
    # KVIK_DISABLE_PLUGINS left kvik-server out on purpose.
    blocked = any(s.distribution == "kvik-server" for s in manager.skipped)
    if not blocked and not manager.pm.is_registered(builtin_parsers):
        manager.register(builtin_parsers, "server", "kvik-server")
    return manager.registry(kind)


def load_parser(kind: str, name: str, manager: PluginManager | None = None) -> Any:
    """The parser class registered as ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return parser_registry(kind, manager).get(name)
    except PluginError as exc:
        raise ValueError(str(exc)) from None
