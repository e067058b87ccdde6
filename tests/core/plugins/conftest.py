"""Fakes for plugin-system tests: plugin modules, platform classes and entry points built in memory."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kvik.plugins import manager as manager_mod
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginManager


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KVIK_PLUGINS", "KVIK_DISABLE_PLUGINS", "KVIK_DEVICE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fresh_manager() -> PluginManager:
    return PluginManager(load_entrypoints=False)


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """``fake_module(name, **attrs)``: a module importable by name for this test only."""

    def make(name: str, **attrs: Any) -> types.ModuleType:
        module = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return make


def make_plugin(name: str, api: str | None = ">=2.0,<3", **hooks: Callable[..., Any]) -> types.ModuleType:
    """A plugin module whose ``hooks`` (hook name -> function) are marked ``@hookimpl``."""
    module = types.ModuleType(name)
    if api is not None:
        module.KVIK_PLUGIN_API = api  # type: ignore[attr-defined]
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    return module


def models_plugin(name: str, *archs: str, target_module: str = "fake_models") -> types.ModuleType:
    """A plugin registering each of ``archs`` to ``target_module:<arch>``."""

    def kvik_register_models(register: Callable[[str, str], None]) -> None:
        for arch in archs:
            register(arch, f"{target_module}:{arch}")

    return make_plugin(name, kvik_register_models=kvik_register_models)


@dataclass
class FakeEntryPoint:
    """What :func:`importlib.metadata.entry_points` yields, with a chosen distribution name."""

    name: str
    value: str
    dist_name: str | None
    group: str = "kvik"

    @property
    def dist(self) -> Any:
        return None if self.dist_name is None else types.SimpleNamespace(name=self.dist_name)

    def load(self) -> Any:
        return md.EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``fake_entry_points(ep, ...)``: the ``kvik`` group yields exactly these entry points."""

    def install(*eps: FakeEntryPoint) -> None:
        def entry_points(group: str) -> list[FakeEntryPoint]:
            return [ep for ep in eps if ep.group == group]

        monkeypatch.setattr(manager_mod.md, "entry_points", entry_points)

    yield install


@pytest.fixture
def fakes() -> types.SimpleNamespace:
    """The helpers above, for test modules (which should not import conftest)."""
    return types.SimpleNamespace(make_plugin=make_plugin, models_plugin=models_plugin, EntryPoint=FakeEntryPoint)
