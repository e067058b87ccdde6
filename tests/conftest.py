"""Settings shared by the whole suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # CI and developers run on two shared cores: one torch thread per test keeps
    # runs predictable and avoids OpenMP threads spinning against each other.
    if "torch" in sys.modules and sys.modules["torch"] is None:  # blocked (KVIK_TEST_WITHOUT_TORCH)
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
