"""The "rocm" platform: AMD GPUs through a ROCm (HIP) build of PyTorch.

A ROCm torch exposes AMD GPUs through ``torch.cuda`` (device type "cuda"),
and Triton compiles the attention kernels for AMD too, so everything but the
build check and the names comes from :class:`kvik_cuda.platform.TorchGPUPlatform`,
including the model runner (pinned inputs, HIP graphs through ``torch.cuda.CUDAGraph``).
Not yet run on an AMD GPU: see README.md.
"""

from __future__ import annotations

from kvik_cuda.platform import TorchGPUPlatform


class ROCmPlatform(TorchGPUPlatform):
    """AMD Instinct/Radeon GPUs through a ROCm build of PyTorch."""

    name = "rocm"
    aliases = ("hip", "amd")
    runtime = "hip"
    runtime_label = "ROCm"
    other_platform = "cuda"
