"""Discovers plugins from entry points and builds the registries."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from kvik.plugins import hookspecs
from kvik.plugins.registry import Entry, PluginError, Registry
from kvik.version import PLUGIN_API_VERSION

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvik"
# Comma-separated entry-point names: only these load (allow-list) / these never load.
ENV_ALLOW = "KVIK_PLUGINS"
ENV_BLOCK = "KVIK_DISABLE_PLUGINS"


@dataclass(slots=True)
class PluginFailure:
    """A plugin that was found but not loaded, and why."""

    plugin: str
    distribution: str | None
    reason: str


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def check_api_compatibility(plugin: str, obj: Any) -> str | None:
    """Return why ``obj`` cannot be loaded under this core's plugin API, or None."""
    declared = getattr(obj, "KVIK_PLUGIN_API", None)
    if declared is None:
        return (
            f"plugin {plugin!r} declares no KVIK_PLUGIN_API; kvik's plugin API is "
            f"{PLUGIN_API_VERSION} (add KVIK_PLUGIN_API = '>={PLUGIN_API_VERSION},<2')"
        )
    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier:
        return f"plugin {plugin!r} has an invalid KVIK_PLUGIN_API {declared!r}"
    if Version(PLUGIN_API_VERSION) not in spec:
        return (
            f"plugin {plugin!r} supports kvik plugin API {declared} but this kvik "
            f"provides {PLUGIN_API_VERSION}; upgrade the plugin or kvik"
        )
    return None


class PluginManager:
    """A pluggy manager plus the registries its plugins fill.

    Tests build a fresh one with ``load_entrypoints=False`` and register the
    plugins they want; the process-wide one comes from :func:`get_plugin_manager`.
    """

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._dists: dict[str, str | None] = {}
        self._registries: dict[str, Registry[Any]] | None = None
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading -----------------------------------------------------------
    def register(self, obj: Any, name: str, distribution: str | None = None) -> bool:
        """Register a plugin object (usually a module); False if refused."""
        reason = check_api_compatibility(name, obj)
        if reason is not None:
            self._fail(name, distribution, reason)
            return False
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self._fail(name, distribution, f"{type(exc).__name__}: {exc}")
            return False
        self._dists[name] = distribution
        self._registries = None
        return True

    def load_entrypoints(self) -> None:
        allow, block = _split_env(ENV_ALLOW), _split_env(ENV_BLOCK)
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if (allow is not None and ep.name not in allow) or (block and ep.name in block):
                continue
            if self.pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist is not None else None
            try:
                obj = ep.load()
            except Exception:
                self._fail(ep.name, dist, traceback.format_exc())
                continue
            self.register(obj, ep.name, dist)

    def _fail(self, plugin: str, dist: str | None, reason: str) -> None:
        self.failures.append(PluginFailure(plugin, dist, reason))
        logger.warning("kvik plugin %r (distribution %s) was not loaded: %s", plugin, dist, reason)

    # -- registries --------------------------------------------------------
    def _build(self) -> dict[str, Registry[Any]]:
        registries: dict[str, Registry[Any]] = {}
        for kind, hook in (
            ("platform", self.pm.hook.kvik_register_platforms),
            ("attention backend", self.pm.hook.kvik_register_attention_backends),
            ("quantization method", self.pm.hook.kvik_register_quantization_methods),
            ("model architecture", self.pm.hook.kvik_register_models),
            ("model format", self.pm.hook.kvik_register_model_formats),
        ):
            registry: Registry[Any] = Registry(kind)
            for impl in hook.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                dist = self._dists.get(plugin_name)

                def register(name: str, target: str, _p: str = plugin_name, _d: str | None = dist) -> None:
                    registry.add(Entry(name=name, target=target, plugin=_p, distribution=_d))

                try:
                    impl.function(register=register)
                except Exception:
                    self._fail(plugin_name, dist, traceback.format_exc())
            registries[kind] = registry
        return registries

    def registry(self, kind: str) -> Registry[Any]:
        if self._registries is None:
            self._registries = self._build()
        return self._registries[kind]

    @property
    def platforms(self) -> Registry[Any]:
        return self.registry("platform")

    @property
    def attention_backends(self) -> Registry[Any]:
        return self.registry("attention backend")

    @property
    def quantization_methods(self) -> Registry[Any]:
        return self.registry("quantization method")

    @property
    def models(self) -> Registry[Any]:
        return self.registry("model architecture")

    @property
    def model_formats(self) -> Registry[Any]:
        return self.registry("model format")

    @property
    def hook(self) -> Any:
        return self.pm.hook


_GLOBAL: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loading entry points on first use."""
    global _GLOBAL
    if _GLOBAL is None:
        _GLOBAL = PluginManager()
    return _GLOBAL


def set_plugin_manager(manager: PluginManager | None) -> PluginManager | None:
    """Replace the process-wide manager (tests); return the previous one so it can be restored."""
    global _GLOBAL
    previous, _GLOBAL = _GLOBAL, manager
    return previous


__all__ = ["PluginError", "PluginFailure", "PluginManager", "get_plugin_manager", "set_plugin_manager"]
