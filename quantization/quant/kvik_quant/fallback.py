"""A fast path that fails to compile on this GPU/Triton falls back to the previous path, once, with a warning.

The Triton kernels are checked under the CPU interpreter in CI and on one H200 by
benchmarks/quant_kernels_sweep.py; another GPU or Triton version may still reject one (a
shared-memory limit, an unsupported conversion). Serving then keeps going on the slower,
older path instead of failing every request. Out-of-memory is not a compile problem and
is raised as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")
_broken: set[str] = set()


def run(name: str, fast: Callable[[], T], slow: Callable[[], T]) -> T:
    """``fast()``, unless it failed before in this process (then ``slow()``)."""
    if name not in _broken:
        try:
            return fast()
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # a failure inside graph capture is not the kernel's: let the capture report it
            logger.warning("kvik-quant: the %s kernel failed here; using the previous path from now on", name,
                           exc_info=True)  # fmt: skip
            _broken.add(name)
    return slow()


def broken() -> frozenset[str]:
    """Names of the fast paths switched off in this process (for benchmarks and diagnostics)."""
    return frozenset(_broken)
