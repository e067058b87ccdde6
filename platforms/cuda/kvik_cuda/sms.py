"""Device facts kernels choose by: the multiprocessor count (grids of the one-row GEMVs, the LoRA expand) and
whether Triton's tensor descriptors load through TMA (the batch-invariant GEMM)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; 8 off CUDA, where it only shapes the interpreter's grids in tests."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8


@functools.cache
def has_tma(device: torch.device) -> bool:
    """True on an NVIDIA GPU with the tensor memory accelerator (Hopper, sm_90, or newer); off CUDA (the
    interpreter, which emulates descriptors) True as well, so that tests run the descriptor path."""
    if device.type != "cuda":
        return True
    if getattr(torch.version, "hip", None):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)
