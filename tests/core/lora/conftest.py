"""Fixtures for the LoRA tests; makes ``lora_world`` importable under --import-mode=importlib."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from lora_world import LoRAWorld, build_world  # noqa: E402


@pytest.fixture(scope="session")
def lora_world(tmp_path_factory: pytest.TempPathFactory) -> LoRAWorld:
    return build_world(tmp_path_factory.mktemp("lora"))
