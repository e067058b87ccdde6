"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` asynchronously.

    On CUDA a copy from pageable memory can synchronize with the stream (the
    driver stages it): under async scheduling the host would then wait for the
    step in flight. Staging through pinned memory keeps the copy asynchronous.
    """
    device = torch.device(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
