"""The "cuda" platform, and the base it shares with kvik-rocm's "rocm" platform.

PyTorch exposes AMD GPUs through the same ``torch.cuda`` API (device type
``"cuda"``) when it is a ROCm build, and Triton compiles for both, so one base
class carries everything; the subclasses differ in which torch build they
accept (``torch.version.cuda`` vs ``torch.version.hip``) and in names.

Probes are the module functions :func:`torch_gpu_build` and
:func:`torch_gpu_visible`: cheap (no CUDA context is created; at most the
driver is asked for a device count) and replaceable in tests.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from kvik.config import PlatformOptions, WeightsMode
from kvik.platforms.interface import MemoryInfo, Platform

if TYPE_CHECKING:
    from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
    from kvik.distributed.parallel_state import AllReduce
    from kvik.worker.interface import ModelRunner

GiB = 1 << 30
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # a prefill chunk this long keeps an H100's matmuls compute-bound
DEFAULT_MAX_NUM_SEQS = 256  # decode matmuls stay weight-bandwidth-bound up to ~256 rows


def torch_gpu_build() -> str | None:
    """Which GPU runtime this torch was built for: "cuda", "hip", or None (CPU-only build)."""
    if getattr(torch.version, "hip", None):
        return "hip"
    if getattr(torch.version, "cuda", None):
        return "cuda"
    return None


def torch_gpu_visible() -> bool:
    """Whether torch sees at least one GPU (``torch.cuda.is_available()``)."""
    return bool(torch.cuda.is_available())


@dataclass(frozen=True, slots=True)
class GPUOptions(PlatformOptions):
    """Options of the cuda and rocm platforms (``platform_options``)."""

    # Swap RMSNorm / SiLU-and-mul / rotary for one-kernel Triton versions (kvik_cuda.fused).
    fused_layers: bool = True
    # Prefill and mixed steps of up to this many tokens run as piecewise CUDA graphs (kvik_cuda.piecewise),
    # padded to a captured size; 0: never (they run eagerly, unpadded). None: the size below which a step's
    # eager launches would outlast its GPU work (kvik_cuda.piecewise.default_max_tokens).
    piecewise_max_tokens: int | None = None


class TorchGPUPlatform(Platform):
    """A GPU driven through ``torch.cuda``: shared by the CUDA and ROCm platforms."""

    device_type = "cuda"
    priority = 100
    distributed_backend = "nccl"  # RCCL on ROCm, under the same name
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch_ref")
    supported_dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")
    default_block_size = 16
    default_max_num_seqs = DEFAULT_MAX_NUM_SEQS
    default_max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
    default_async_scheduling = True  # the host's scheduling hides behind the GPU's step
    options_type = GPUOptions
    runtime: ClassVar[str]  # the torch_gpu_build() value this platform needs
    runtime_label: ClassVar[str]  # for messages: "CUDA", "ROCm"
    other_platform: ClassVar[str]  # the platform that runs the other GPU build of torch

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> PlatformOptions:
        limit = options.get("piecewise_max_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"piecewise_max_tokens must be an int >= 0 (0: no piecewise CUDA graphs), got {limit!r}")
        return super().resolve_options(options, config)

    @classmethod
    def is_available(cls) -> bool:
        try:
            return torch_gpu_build() == cls.runtime and torch_gpu_visible()
        except Exception:  # a broken driver must not break platform listing
            return False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        build = torch_gpu_build()
        if build is None:
            return f"this torch ({torch.__version__}) is a CPU-only build; install a {cls.runtime_label} build of torch"
        if build != cls.runtime:
            return (
                f"this torch ({torch.__version__}) is built for {build.upper()}, not {cls.runtime_label}; "
                f"use device={cls.other_platform!r}"
            )
        try:
            visible = torch_gpu_visible()
        except Exception as exc:
            return f"the GPU runtime failed to start: {type(exc).__name__}: {exc}"
        if not visible:
            mask = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))
            hint = f" (CUDA_VISIBLE_DEVICES={mask!r})" if mask is not None else ""
            return f"torch.cuda.is_available() is False: no {cls.runtime_label} GPU or driver found{hint}"
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def default_dtype(self, model_dtype: str, quantization: str | None = None) -> str:
        """fp16 checkpoints stay fp16; everything else runs in bf16 (fp16 on GPUs without bf16)."""
        if model_dtype == "float16":
            return "float16"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"

    def memory_info(self) -> MemoryInfo:
        """The current device's memory as the driver reports it (other processes' use included)."""
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryInfo(total=int(total), free=int(free))

    def configure(self, config: ResolvedConfig, model_config: ModelConfig) -> list[str]:
        notes: list[str] = []
        if model_config.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"dtype='bfloat16' is not supported by {torch.cuda.get_device_name(self.device)}; "
                "use dtype='float16' (or 'auto')"
            )
        if config.enforce_eager:
            notes.append("enforce_eager: CUDA graphs are off")
        if config.kv_cache_dtype != "auto" and config.attention_backend == "triton":
            self._check_fp8_kv_cache()
        return notes

    def _check_fp8_kv_cache(self) -> None:
        """The Triton kernels load float8 e4m3 tiles (``fp8e4nv``): NVIDIA compute capability >= 8.9 only."""
        alternatives = (
            "use kv_cache_dtype='auto', or attention_backend='torch_ref' (dequantizes in PyTorch; slower)"
        )
        if self.runtime == "hip":
            raise ValueError(
                f"kv_cache_dtype='fp8' with the triton attention backend is not verified on {self.runtime_label} "
                f"GPUs (AMD's native FP8 is e4m3fnuz, not e4m3fn); {alternatives}"
            )
        major, minor = torch.cuda.get_device_capability(self.device)
        if (major, minor) < (8, 9):
            raise ValueError(
                f"kv_cache_dtype='fp8' with the triton attention backend needs an NVIDIA GPU of compute capability "
                f">= 8.9 (L4, L40S, H100, H200, ...); {torch.cuda.get_device_name(self.device)} is {major}.{minor}: "
                f"{alternatives}"
            )

    def quantized_weights_mode(self, config: EngineConfig, method: str) -> WeightsMode:
        """Packed when the method has GPU kernels (``QuantizationMethod.devices`` lists "cuda"), else dense."""
        from kvik.plugins.manager import get_plugin_manager

        try:
            method_cls = get_plugin_manager().quantization_methods.get(method)
        except Exception:  # an unknown or broken method is reported when the runner loads it
            return WeightsMode.DEQUANTIZE
        return WeightsMode.QUANTIZED if self.device_type in getattr(method_cls, "devices", ()) else WeightsMode.DEQUANTIZE

    def device_count(self) -> int | None:
        return int(torch.cuda.device_count())

    def bind_rank(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)  # self.device is the current device from here on

    def tensor_parallel_all_reduce(self, group: Any, dtype: str) -> AllReduce | None:
        if self.runtime != "cuda":  # ROCm: RCCL for every sum (symmetric memory there is untested)
            return None
        from kvik_cuda.symm_all_reduce import symmetric_all_reduce

        return symmetric_all_reduce(group, getattr(torch, dtype), self.device)

    def create_model_runner(self, config: ResolvedConfig, model_config: ModelConfig) -> ModelRunner:
        from kvik_cuda.runner import CUDAModelRunner

        return CUDAModelRunner(config, model_config, self.device, self)

    def describe(self) -> dict[str, str]:
        info = {**super().describe(), "torch": torch.__version__}
        info[self.runtime_label.lower()] = str(torch.version.hip if self.runtime == "hip" else torch.version.cuda)
        try:
            info["triton"] = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            info["triton"] = "not installed (the 'triton' attention backend is unavailable)"
        info["nccl"] = _nccl_version()
        if not self.is_available():
            info["status"] = f"unavailable: {self.unavailable_reason()}"
            return info
        props = torch.cuda.get_device_properties(self.device)
        memory = self.memory_info()
        info.update(
            {
                "devices": str(torch.cuda.device_count()),
                "device": f"{props.name} (#{self.device.index})",
                "compute capability": f"{props.major}.{props.minor}",
                "multiprocessors": str(props.multi_processor_count),
                "memory": f"{memory.total / GiB:.1f} GiB total, {memory.free / GiB:.1f} GiB free",
                "bf16": "yes" if torch.cuda.is_bf16_supported() else "no",
            }
        )
        return info


def _nccl_version() -> str:
    """NCCL (RCCL on ROCm) as torch.distributed sees it: version, or why it is missing."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_nccl_available()):
            return "not available in this torch build"
        version = torch.cuda.nccl.version()
        return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception as exc:  # describe() must never fail
        return f"unknown ({type(exc).__name__}: {exc})"


class CUDAPlatform(TorchGPUPlatform):
    """NVIDIA GPUs through a CUDA build of PyTorch; attention in Triton kernels."""

    name = "cuda"
    aliases = ("nvidia",)
    runtime = "cuda"
    runtime_label = "CUDA"
    other_platform = "rocm"
