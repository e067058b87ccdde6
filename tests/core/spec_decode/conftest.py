"""Fixtures for the speculative-decoding tests: a plugin manager with the cpu platform and the replay proposer."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

_HERE = os.path.dirname(__file__)
if _HERE not in sys.path:  # --import-mode=importlib: make spec_replay_plugin importable
    sys.path.insert(0, _HERE)

import spec_replay_plugin  # noqa: E402


@pytest.fixture
def replay_manager(kvik_plugin_manager) -> Iterator[object]:
    """The process-wide manager: builtin + cpu + the replay proposer (a third-party plugin)."""
    import kvik_cpu.plugin

    assert kvik_plugin_manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    assert kvik_plugin_manager.register(spec_replay_plugin, "spec-replay", "spec-replay-test")
    spec_replay_plugin.CONTINUATIONS.clear()
    yield spec_replay_plugin
    spec_replay_plugin.CONTINUATIONS.clear()
