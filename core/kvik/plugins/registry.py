"""Named registries of lazily imported plugin classes."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class PluginError(RuntimeError):
    """A plugin is missing, broken, incompatible or ambiguous."""


@dataclass(slots=True)
class Entry:
    """One registered implementation: ``target`` is ``"module:Class"``."""

    name: str
    target: str
    plugin: str  # the pluggy plugin name (entry-point name or module)
    distribution: str | None  # the installed distribution it came from
    _loaded: Any = field(default=None, repr=False)

    def load(self) -> Any:
        if self._loaded is None:
            module_name, _, attr = self.target.partition(":")
            if not attr:
                raise PluginError(
                    f"{self.name!r} from {self.source} has target {self.target!r}; expected 'module:Class'"
                )
            try:
                module = importlib.import_module(module_name)
                self._loaded = getattr(module, attr)
            except Exception as exc:
                raise PluginError(
                    f"could not import {self.target} for {self.name!r} "
                    f"(from {self.source}): {type(exc).__name__}: {exc}"
                ) from exc
        return self._loaded

    @property
    def source(self) -> str:
        return self.distribution or self.plugin


class Registry(Generic[T]):
    """Maps names to :class:`Entry`; two plugins claiming one name is an error."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._conflicts: dict[str, list[Entry]] = {}

    def add(self, entry: Entry) -> None:
        if entry.name in self._conflicts:
            self._conflicts[entry.name].append(entry)
            return
        existing = self._entries.get(entry.name)
        if existing is not None and existing.target != entry.target:
            del self._entries[entry.name]
            self._conflicts[entry.name] = [existing, entry]
            return
        self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    @property
    def conflicts(self) -> dict[str, list[Entry]]:
        return dict(self._conflicts)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name in self._conflicts:
            who = " and ".join(f"{e.source} ({e.target})" for e in self._conflicts[name])
            raise PluginError(
                f"{self.kind} {name!r} is registered by more than one plugin: {who}. "
                "Uninstall one of them or block it with KVIK_DISABLE_PLUGINS."
            )
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def get(self, name: str) -> T:
        return self.entry(name).load()  # type: ignore[no-any-return]
