"""Discovers plugins from entry points and builds the registries."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.metadata as md
import inspect
import logging
import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from kvik.plugins import hookspecs
from kvik.plugins.registry import Entry, PluginError, Registry
from kvik.version import PLUGIN_API_VERSION

if TYPE_CHECKING:
    from kvik.config import EngineConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvik"
# Comma-separated entry-point (or distribution) names: only these load (allow-list) / these never load.
ENV_ALLOW = "KVIK_PLUGINS"
ENV_BLOCK = "KVIK_DISABLE_PLUGINS"

# Registry kind -> registration hook name, in the order reports list them.
REGISTRATION_HOOKS: dict[str, str] = {
    "platform": "kvik_register_platforms",
    "attention backend": "kvik_register_attention_backends",
    "quantization method": "kvik_register_quantization_methods",
    "model architecture": "kvik_register_models",
    "model format": "kvik_register_model_formats",
    "structured output backend": "kvik_register_structured_output_backends",
    "tool parser": "kvik_register_tool_parsers",
    "reasoning parser": "kvik_register_reasoning_parsers",
    "speculative proposer": "kvik_register_spec_proposers",
    "executor": "kvik_register_executors",
}
_HOOK_NAMES = tuple(h.__name__ for h in hookspecs.ALL_HOOKS)


@dataclass(slots=True)
class PluginFailure:
    """A plugin that was found but not loaded (or whose hook raised), and why."""

    plugin: str
    distribution: str | None
    reason: str


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _suggested_range() -> str:
    major = Version(PLUGIN_API_VERSION).major
    return f">={PLUGIN_API_VERSION},<{major + 1}"


def check_api_compatibility(plugin: str, obj: Any) -> str | None:
    """Return why ``obj`` cannot be loaded under this core's plugin API, or None."""
    declared = getattr(obj, "KVIK_PLUGIN_API", None)
    if declared is None:
        return (
            f"plugin {plugin!r} declares no KVIK_PLUGIN_API; kvik's plugin API is "
            f"{PLUGIN_API_VERSION} (add KVIK_PLUGIN_API = '{_suggested_range()}' to the plugin module)"
        )
    try:
        spec = SpecifierSet(str(declared))
    except InvalidSpecifier:
        return (
            f"plugin {plugin!r} has an invalid KVIK_PLUGIN_API {declared!r}; "
            f"expected a version range such as '{_suggested_range()}'"
        )
    if Version(PLUGIN_API_VERSION) not in spec:
        return (
            f"plugin {plugin!r} supports kvik plugin API {declared} but this kvik "
            f"provides {PLUGIN_API_VERSION}; upgrade the plugin or kvik"
        )
    return None


def _undecorated_hooks(obj: Any) -> list[str]:
    """Hook-named functions on ``obj`` that lack ``@hookimpl`` (pluggy would ignore them silently)."""
    found = []
    for name in dir(obj):
        fn = getattr(obj, name, None)
        if name.startswith("kvik_") and inspect.isroutine(fn) and getattr(fn, "kvik_impl", None) is None:
            found.append(name)
    return found


class PluginManager:
    """A pluggy manager plus the registries its plugins fill.

    Tests build a fresh one with ``load_entrypoints=False`` and register the
    plugins they want; the process-wide one comes from :func:`get_plugin_manager`.
    """

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._load_failures: list[PluginFailure] = []
        self._build_failures: list[PluginFailure] = []
        # Entry points found but not loaded because of KVIK_PLUGINS / KVIK_DISABLE_PLUGINS.
        self.skipped: list[PluginFailure] = []
        self._dists: dict[str, str | None] = {}
        self._registries: dict[str, Registry[Any]] | None = None
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading -----------------------------------------------------------
    def register(self, obj: Any, name: str, distribution: str | None = None) -> bool:
        """Register a plugin object (usually a module); False if refused (the reason is logged)."""
        reason = check_api_compatibility(name, obj)
        if reason is not None:
            self._fail(name, distribution, reason)
            return False
        if self.pm.has_plugin(name):
            self._fail(name, distribution, f"a plugin named {name!r} is already registered (from {self._source(name)})")
            return False
        if self.pm.is_registered(obj):
            self._fail(name, distribution, f"this object is already registered as {self.pm.get_name(obj)!r}")
            return False
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self._fail(name, distribution, self._explain(exc))
            return False
        for fn in _undecorated_hooks(obj):
            logger.warning("kvik plugin %r defines %s() without @hookimpl; kvik will not call it", name, fn)
        self._dists[name] = distribution
        self._registries = None
        return True

    def load_entrypoints(self) -> None:
        """Load every entry point of the ``kvik`` group, honouring the allow/block lists."""
        allow, block = _split_env(ENV_ALLOW), _split_env(ENV_BLOCK)
        seen: set[str] = set()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            seen.update({ep.name, dist or ep.name})
            names = {ep.name, dist or ep.name}
            if allow is not None and not names & allow:
                self.skipped.append(PluginFailure(ep.name, dist, f"not listed in {ENV_ALLOW}"))
                continue
            if block and names & block:
                self.skipped.append(PluginFailure(ep.name, dist, f"listed in {ENV_BLOCK}"))
                continue
            if self.pm.has_plugin(ep.name):
                if self._dists.get(ep.name) != dist:  # same name from two distributions
                    self._fail(
                        ep.name, dist, f"entry point name {ep.name!r} is already used by {self._source(ep.name)}"
                    )
                continue  # the same distribution seen twice on sys.path
            try:
                obj = ep.load()
            except Exception:
                self._fail(ep.name, dist, f"importing {ep.value} failed:\n{traceback.format_exc()}")
                continue
            self.register(obj, ep.name, dist)
        for env, listed in ((ENV_ALLOW, allow), (ENV_BLOCK, block)):
            if listed and listed - seen:
                logger.warning(
                    "%s names %s, which no installed kvik plugin provides; installed: %s",
                    env,
                    ", ".join(sorted(listed - seen)),
                    ", ".join(sorted(seen)) or "none",
                )

    def _source(self, plugin: str) -> str:
        return self._dists.get(plugin) or plugin

    def _explain(self, exc: Exception) -> str:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, pluggy.PluginValidationError) and "unknown hook" in str(exc):
            bad = str(exc).split("'")[1] if "'" in str(exc) else ""
            close = difflib.get_close_matches(bad, _HOOK_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message += f" ({hint}kvik's hooks are: {', '.join(_HOOK_NAMES)})"
        return message

    def _fail(self, plugin: str, dist: str | None, reason: str, during_build: bool = False) -> None:
        (self._build_failures if during_build else self._load_failures).append(PluginFailure(plugin, dist, reason))
        what = "registration hook failed" if during_build else "was not loaded"
        logger.warning("kvik plugin %r (distribution %s) %s: %s", plugin, dist, what, reason)

    @property
    def failures(self) -> list[PluginFailure]:
        """Plugins refused at load time, and plugins whose registration hook raised."""
        if self._registries is None and self.pm.get_plugins():
            self._registries = self._build()
        return self._load_failures + self._build_failures

    def plugins(self) -> list[tuple[str, str | None]]:
        """``(plugin name, distribution)`` of every loaded plugin, sorted by name."""
        return sorted((name, self._dists.get(name)) for name, _ in self.pm.list_name_plugin())

    # -- registries --------------------------------------------------------
    def _build(self) -> dict[str, Registry[Any]]:
        self._build_failures = []
        registries: dict[str, Registry[Any]] = {}
        for kind, hook_name in REGISTRATION_HOOKS.items():
            registry: Registry[Any] = Registry(kind)
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                self._call_registration(registry, impl)
            for name, entries in registry.conflicts.items():
                logger.warning(
                    "%s %r is registered by more than one plugin (%s); it cannot be used until one is removed",
                    kind,
                    name,
                    " and ".join(e.source for e in entries),
                )
            registries[kind] = registry
        return registries

    def _call_registration(self, registry: Registry[Any], impl: Any) -> None:
        """Run one plugin's registration hook; a hook that raises registers nothing."""
        plugin_name = impl.plugin_name
        dist = self._dists.get(plugin_name)
        pending: list[Entry] = []

        def register(name: str, target: str) -> None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"register() needs a non-empty name string, got {name!r}")
            if not isinstance(target, str) or ":" not in target:
                raise ValueError(f"register({name!r}, ...) needs a 'module:Class' string target, got {target!r}")
            pending.append(Entry(name=name, target=target, plugin=plugin_name, distribution=dist))

        # pluggy lets an implementation take a subset of the hook's arguments.
        available = {"register": register}
        try:
            impl.function(**{arg: available[arg] for arg in impl.argnames})
        except Exception:
            self._fail(plugin_name, dist, traceback.format_exc(), during_build=True)
            return
        for entry in pending:
            registry.add(entry)

    def registry(self, kind: str) -> Registry[Any]:
        if self._registries is None:
            self._registries = self._build()
        return self._registries[kind]

    def conflicts(self) -> dict[str, dict[str, list[Entry]]]:
        """``{kind: {name: [entries]}}`` for every name claimed by more than one plugin."""
        return {kind: self.registry(kind).conflicts for kind in REGISTRATION_HOOKS if self.registry(kind).conflicts}

    def run_configure(self, config: EngineConfig, sources: dict[str, str] | None = None) -> list[str]:
        """Call every plugin's ``kvik_configure``; return their notes prefixed with the plugin name.

        ``sources`` (optional) gets ``{field: "plugin <name>"}`` for every field a plugin changed.
        """
        notes: list[str] = []
        for impl in reversed(self.pm.hook.kvik_configure.get_hookimpls()):  # registration order
            before = copy.deepcopy(config)
            result: Any = impl.function(**{arg: config for arg in impl.argnames if arg == "config"})
            for note in result or []:
                notes.append(f"{impl.plugin_name}: {note}")
            if sources is not None:
                for f in dataclasses.fields(config):
                    if getattr(config, f.name) != getattr(before, f.name):
                        sources[f.name] = f"plugin {impl.plugin_name}"
        return notes

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
    def structured_output_backends(self) -> Registry[Any]:
        return self.registry("structured output backend")

    @property
    def spec_proposers(self) -> Registry[Any]:
        return self.registry("speculative proposer")

    @property
    def executors(self) -> Registry[Any]:
        return self.registry("executor")

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
