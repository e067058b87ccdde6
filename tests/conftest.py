"""Settings shared by the whole suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

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


@pytest.fixture
def row_by_row_interpreted_dot(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Under Triton's interpreter a ``tl.dot`` is one numpy matmul, and on some CPUs OpenBLAS rounds a row
    differently by its position in the tile (its kernels' edge handling: ~40% of the rows of a 16 x 32 @ 32 x 16
    product on one of our AVX2-only VMs). A GPU's MMA computes each row alike, so that batch-
    invariance tests check a kernel's reduction order and not the host's BLAS, each row is its own product here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    from triton.runtime import interpreter

    whole = interpreter.InterpreterBuilder.create_dot

    def by_row(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        handle = interpreter.TensorHandle

        def row(i: int) -> Any:
            a_i, d_i = handle(a.data[..., i : i + 1, :], a.dtype), handle(d.data[..., i : i + 1, :], d.dtype)
            return whole(self, a_i, b, d_i, input_precision, max_num_imprecise_acc)

        rows = [row(i) for i in range(a.data.shape[-2])]
        return handle(np.concatenate([r.data for r in rows], axis=-2), rows[0].dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", by_row)
    yield
