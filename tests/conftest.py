"""Settings shared by the whole suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Triton kernels run under Triton's CPU interpreter when no GPU is present. The flag is read when
# triton decorates a kernel, so it is set here, before any test module (of any directory, in any
# order) imports a kernel module; without torch (KVIK_TEST_WITHOUT_TORCH) no kernel is imported.
if os.environ.get("KVIK_TEST_WITHOUT_TORCH") != "1":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_kvik_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Derived artifacts kvik keeps on disk (built GGUF tokenizers) go to this session's folder, not ~/.cache.
    previous = os.environ.get("KVIK_CACHE_DIR")
    os.environ["KVIK_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvik-cache"))
    yield
    if previous is None:
        os.environ.pop("KVIK_CACHE_DIR", None)
    else:
        os.environ["KVIK_CACHE_DIR"] = previous


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
