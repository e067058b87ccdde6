"""Host<->device copies that never make the host wait for more of the device's work than it needs."""

from __future__ import annotations

from collections.abc import Callable

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


def start_to_host(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying a device tensor to the host; the returned callable waits for that copy and returns
    the host tensor.

    On CUDA the copy goes to pinned memory behind an event, so waiting for it does not wait for work
    queued after it: under async scheduling the next step is launched before this step's results are
    read, and a plain ``.cpu()`` issued then would wait for that whole next step too.
    """
    if tensor.device.type != "cuda":
        host = tensor.cpu()
        return lambda: host
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()

    def wait() -> torch.Tensor:
        event.synchronize()
        return host

    return wait
