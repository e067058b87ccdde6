"""Run the Triton kernels under Triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton decorates any kernel, i.e. before
``kvik_triton_attention.kernels`` is imported, which this conftest guarantees.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = os.path.dirname(__file__)
if _HERE not in sys.path:  # --import-mode=importlib: make host_cuda_platform importable from the tests
    sys.path.insert(0, _HERE)


@pytest.fixture
def _one_thread():  # type: ignore[no-untyped-def]
    """Torch at one thread for the test (the interpreted kernels' runs stay fast and repeatable)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
