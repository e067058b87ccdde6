"""kvik's pytest plugin: fixtures and conformance checks for plugin authors.

Installed with kvik-core through the ``pytest11`` entry point, so any test
suite that has kvik installed can use::

    def test_my_backend(kvik_plugin_manager, tiny_model_dir):
        path = tiny_model_dir("llama", num_hidden_layers=1)
        ...

    from kvik.testing.pytest_plugin import check_attention_backend, check_model_architecture, check_platform

This module is imported by every pytest run in an environment with kvik, so it
imports nothing heavy (no torch) at import time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvik.plugins.manager import PluginManager

# The conformance checks, re-exported lazily (they import torch).
_CONFORMANCE = {
    "check_attention_backend": "kvik.testing.conformance.attention",
    "check_fp8_kv_cache": "kvik.testing.conformance.fp8_kv",
    "check_batch_invariance": "kvik.testing.conformance.batch_invariance",
    "check_quantization_method": "kvik.testing.conformance.quantization",
    "check_platform": "kvik.testing.conformance.platform",
    "check_model_architecture": "kvik.testing.conformance.model",
}


def __getattr__(name: str) -> Any:
    module_name = _CONFORMANCE.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


@pytest.fixture
def kvik_plugin_manager() -> Iterator[PluginManager]:
    """A fresh plugin manager with only kvik's builtin plugin, installed as the process-wide one.

    Nothing installed in the environment leaks in; register your own plugin
    with ``kvik_plugin_manager.register(module, "name", "my-dist")``. The
    previous process-wide manager is restored afterwards.
    """
    import kvik.builtin
    from kvik.plugins import manager as manager_mod

    fresh = manager_mod.PluginManager(load_entrypoints=False)
    fresh.register(kvik.builtin, "builtin", "kvik-core")
    previous = manager_mod.set_plugin_manager(fresh)
    try:
        yield fresh
    finally:
        manager_mod.set_plugin_manager(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_model_dir(arch="llama", dtype="float32", seed=0, **config_overrides) -> Path``.

    Builds a random tiny checkpoint with :func:`kvik.testing.tiny_models.make_tiny_model`
    once per session per distinct set of arguments; treat the directory as read-only.
    """
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("kvik_tiny_models")

    def build(arch: str = "llama", dtype: str = "float32", seed: int = 0, **config_overrides: Any) -> Path:
        from kvik.testing.tiny_models import make_tiny_model

        key = json.dumps({"arch": arch, "dtype": dtype, "seed": seed, **config_overrides}, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_tiny_model(
                root / f"m{len(cache)}_{arch}", arch=arch, dtype=dtype, seed=seed, **config_overrides
            )
        return cache[key]

    return build
