"""kvik's plugin system: pluggy hookspecs, entry-point discovery and registries."""

from kvik.plugins.hookspecs import hookimpl, hookspec
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.plugins.registry import Entry, PluginError, Registry

__all__ = [
    "Entry",
    "PluginError",
    "PluginManager",
    "Registry",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
]
