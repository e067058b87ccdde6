"""The device's multiprocessor count, for the kernels that size their grids by it (one-row GEMVs, the LoRA
expand)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``; 8 off CUDA, where it only shapes the interpreter's grids in tests."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8
