"""What the device can run: FP8 tensor cores, Triton; and the opt-in torch emulation for numerics checks."""

from __future__ import annotations

import functools
import os

import torch

# KVIK_QUANT_EMULATE=1 lets FP8 methods run on any device through the torch reference path
# (dequantize then matmul, activation quantization emulated): slow, for numerics checks only.
EMULATE_ENV = "KVIK_QUANT_EMULATE"
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CI's CPU runs of the kernels), which cannot execute inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def emulate() -> bool:
    return os.environ.get(EMULATE_ENV, "") not in ("", "0")


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA A100-SXM4-80GB, compute capability 8.0)``."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"


def fp8_supported(device: torch.device) -> bool:
    """True on an NVIDIA GPU with FP8 tensor cores (ROCm's FP8 is the e4m3fnuz variant: not handled here)."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= FP8_MIN_CAPABILITY


def fp8_refusal(method: str, device: torch.device, dequantize_works: bool) -> list[str]:
    """The start-up error for an FP8 method on a device without FP8 tensor cores (empty when it can run)."""
    if fp8_supported(device) or emulate():
        return []
    instead = [
        "a GPU with FP8 tensor cores (NVIDIA compute capability >= 8.9: L4, L40S, RTX 4090, H100, H200, B200)",
    ]
    if dequantize_works:
        instead.append("quantized_weights='dequantize' (this checkpoint's weights become dense in the compute dtype)")
    else:
        instead.append("no quantization= (dense weights)")
    instead.append("an INT4 GPTQ/AWQ checkpoint (weight-only; runs on any GPU and, slowly, on CPU)")
    return [
        f"quantization {method!r} (FP8 W8A8) cannot run on {describe(device)}: its matmuls need FP8 tensor "
        f"cores. What works: {'; or '.join(instead)}. {EMULATE_ENV}=1 runs the slow torch reference instead "
        "(for numerics checks)"
    ]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def has_tma(device: torch.device) -> bool:
    """True on an NVIDIA GPU with the tensor memory accelerator (Hopper, sm_90, or newer), which Triton's tensor
    descriptors load through."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)
