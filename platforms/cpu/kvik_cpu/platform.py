"""The "cpu" platform: PyTorch on the host CPU.

Defaults are chosen for CPUs, where one step's cost grows with its token
count from the first token on (there is no idle parallel hardware to fill):

* dtype: bfloat16 only when the checkpoint is bf16/fp16 *and* the CPU has
  native bf16 dot products (AVX512-BF16 or AMX on x86, BF16 on Arm). On such
  a CPU a [64, 2048] x [2048, 2048] matmul took 1.5 ms in bf16 vs 6.9 ms in
  fp32 (1 thread, AMD EPYC with avx512_bf16), and a SmolLM2-135M-shaped model
  served 8 x (128 prompt + 32 output) tokens in 9.1 s in bf16 vs 20.9 s in fp32.
  Without those instructions bf16 is emulated through fp32 and slower than
  fp32, so float32 is used.
* GGUF checkpoints: bfloat16 with the weights kept packed (torch's int4 CPU kernel, kvik_gguf's
  repack; ``quantized_weights="auto"``) on every CPU, native bf16 or not: the kernel widens bf16
  to float32 itself, and reads 4-8 bits per weight instead of 32. On the bundled SmolLM2 Q4_1 at
  two threads of an AVX2-only EPYC it decoded one stream at 30-33 tok/s against 16-18 for the
  float32 dequantized model, served 8 requests at 116-125 against 64-66 tok/s and peaked at
  487 MiB against 922 (same run, docs/benchmarks.md). On an AVX512-BF16 CPU: 40 tok/s against
  21-23 dequantized bf16, 707 MB against 1,160. In float32 the packed kernel is a scalar loop, so
  ``dtype="float32"`` runs (and other methods) dequantize at load.
* threads: one per physical core of the affinity mask (SMT siblings share a
  core's vector units).
* KV cache: RAM is shared with the OS and other processes, so the pool
  defaults to at most 4 GiB or a quarter of available RAM (vLLM's CPU backend
  also reserves 4 GiB by default) instead of a fraction of all memory; the
  memory planner then trims it to what ``max_num_seqs`` full-length requests
  can use, so a one-stream ``kvik generate`` (``max_num_seqs=1``) holds one context.
* compile_decode: off. Compiling the decode step (kvik_cpu.runner) drops the
  per-op Python of one stream's step, but on the 2-core dev machine it was at
  best level with eager end to end, and its first compile takes tens of seconds
  against a ~3 s cold start for ``kvik generate`` (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import platform as py_platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil
from kvik.config import PlatformOptions, WeightsMode
from kvik.platforms.interface import MemoryInfo, Platform

from kvik_cpu import cpuinfo

if TYPE_CHECKING:
    from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
    from kvik.worker.interface import ModelRunner

logger = logging.getLogger(__name__)

GiB = 1 << 30
DEFAULT_KV_CACHE_CAP = 4 * GiB
# Decode throughput saturates early on a CPU: a SmolLM2-135M-shaped fp32 model (random
# weights, 1 thread, torch_ref) gave 10 / 51 / 53 / 49 output tok/s at 1 / 8 / 32 / 64
# concurrent sequences; beyond ~32 a batch only adds latency.
DEFAULT_MAX_NUM_SEQS = 32
# Tokens per step (the prefill chunk): the same model prefilled two 1024-token prompts at
# 96 / 118 / 108 tok/s with 256 / 1024 / 2048-token steps; 1024 is the fastest and bounds
# how long decoding requests wait behind a chunk.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 1024
IPEX_ATTENTION_BACKEND = "ipex_paged"  # preferred if some plugin registers it and IPEX imports
CGROUP_MEMORY = Path("/sys/fs/cgroup")

_ipex_notice_logged = False  # the IPEX notice is logged once per process


def _cgroup_limit(root: Path = CGROUP_MEMORY) -> tuple[int, int] | None:
    """(limit, current) bytes of a cgroup v2 memory limit, or None when unlimited/unknown."""
    try:
        limit = (root / "memory.max").read_text().strip()
        current = int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else (int(limit), current)


@dataclass(frozen=True, slots=True)
class CPUOptions(PlatformOptions):
    """The cpu platform's options (``platform_options``; ``num_threads`` is also a top-level option)."""

    # torch intra-op threads; default: one per physical core of ``cpu_affinity``
    num_threads: int = 0
    # CPUs the process runs on: "0-3,6" or a list of ids; default: the current affinity mask
    cpu_affinity: tuple[int, ...] = ()
    # Run decode-only steps through torch.compile (kvik_cpu.runner). Off by default: the first
    # compile takes tens of seconds on a small CPU, which a short session never wins back.
    compile_decode: bool = False
    # Run the model in ONNX Runtime instead of torch (kvik_cpu.onnx_runner): a folder `kvik export onnx`
    # wrote, or "auto" to export this model once into kvik's cache. Off ("") by default: it needs the
    # onnx extra, runs one request per call (its win is a single stream) and has no prefix caching.
    onnx_model: str = ""


class CPUPlatform(Platform):
    """Runs models with PyTorch on the CPU; always available, lowest priority."""

    name = "cpu"
    device_type = "cpu"
    priority = 0  # any accelerator that is present wins auto-selection
    attention_backends: ClassVar[tuple[str, ...]] = ("torch_ref",)
    supported_dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")
    # 16, as on the other platforms. torch_ref gathers K/V slot by slot, so a larger block
    # saves no work: 8 requests x (384 prompt + 128 output tokens) on a 4-layer hidden-256
    # Llama decoded at 379/366 tok/s with 16 and 387/370 with 64 (1 thread, within noise).
    # Smaller blocks keep prefix-cache hits and the last block's waste fine-grained.
    default_block_size = 16
    default_max_num_seqs = DEFAULT_MAX_NUM_SEQS
    default_max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
    options_type = CPUOptions
    distributed_backend = "gloo"  # ranks are processes on this host (tests, CPU clusters)

    def __init__(self) -> None:
        global _ipex_notice_logged
        self.flags = cpuinfo.read_cpu_flags()
        self.ipex = cpuinfo.probe_ipex()
        if self.ipex.module is not None:
            # Instance attribute: prefer an IPEX backend when one is registered, else torch_ref.
            self.attention_backends = (IPEX_ATTENTION_BACKEND, *type(self).attention_backends)  # type: ignore[misc]
        if not _ipex_notice_logged:
            _ipex_notice_logged = True
            if self.ipex.module is None:
                logger.info("kvik-cpu: %s; running pure PyTorch (attention: torch_ref)", self.ipex.reason)
            else:
                logger.info("kvik-cpu: %s", self.ipex.reason)

    @classmethod
    def is_available(cls) -> bool:
        return True  # PyTorch always has a CPU device

    def default_dtype(self, model_dtype: str, quantization: str | None = None) -> str:
        """bf16 for GGUF checkpoints (packed, where torch has its int4 CPU kernel) and for bf16/fp16 checkpoints
        on CPUs with native bf16, else float32 (see the module docstring)."""
        if quantization == "gguf":
            import torch

            if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return "bfloat16"
        if model_dtype in ("bfloat16", "float16") and cpuinfo.has_fast_bf16(self.flags):
            return "bfloat16"
        return "float32"

    def quantized_weights_mode(self, config: EngineConfig, method: str) -> WeightsMode:
        """Packed GGUF weights when the step computes in bfloat16 (see the module docstring), else dense."""
        dtype = self.default_dtype("bfloat16", method) if config.dtype == "auto" else config.dtype
        if method == "gguf" and dtype == "bfloat16":
            return WeightsMode.QUANTIZED
        return WeightsMode.DEQUANTIZE

    def memory_info(self) -> MemoryInfo:
        """System RAM (capped by a cgroup v2 limit): total, and what is available now."""
        vm = psutil.virtual_memory()
        total, free = int(vm.total), int(vm.available)
        cgroup = _cgroup_limit()
        if cgroup is not None:
            limit, current = cgroup
            total, free = min(total, limit), max(0, min(free, limit - current))
        return MemoryInfo(total=total, free=free)

    def engine_defaults(self, config: EngineConfig, model_config: ModelConfig) -> dict[str, Any]:
        defaults = super().engine_defaults(config, model_config)
        if config.kv_cache_memory is None and config.num_kv_blocks is None:
            defaults["kv_cache_memory"] = max(GiB // 4, min(DEFAULT_KV_CACHE_CAP, self.memory_info().free // 4))
        return defaults

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> CPUOptions:
        spec = options.get("cpu_affinity")
        cpus = self._check_affinity(spec) if spec is not None else cpuinfo.usable_cpus()
        threads = options.get("num_threads") or cpuinfo.physical_cores(cpus)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {threads!r}")
        compile_decode = options.get("compile_decode", False)
        if not isinstance(compile_decode, bool):
            raise ValueError(f"compile_decode must be True or False, got {compile_decode!r}")
        onnx_model = options.get("onnx_model", "")
        if not isinstance(onnx_model, str):
            raise ValueError(f"onnx_model must be a folder path or 'auto', got {onnx_model!r}")
        if onnx_model not in ("", "auto") and not (Path(onnx_model).expanduser() / "genai_config.json").is_file():
            raise ValueError(
                f"onnx_model={onnx_model!r} is not an ONNX Runtime GenAI model folder (no genai_config.json); "
                "write one with `kvik export onnx`, or pass onnx_model='auto'"
            )
        return CPUOptions(num_threads=threads, cpu_affinity=tuple(cpus), compile_decode=compile_decode,
                          onnx_model=onnx_model)  # fmt: skip

    def configure(self, config: ResolvedConfig, model_config: ModelConfig) -> list[str]:
        """Pin the process to the chosen CPUs (when they differ from its mask) and set torch's threads."""
        notes: list[str] = []
        options = config.platform_options
        assert isinstance(options, CPUOptions)
        if list(options.cpu_affinity) != cpuinfo.usable_cpus():
            os.sched_setaffinity(0, options.cpu_affinity)
            notes.append(f"pinned to CPUs {_ranges(list(options.cpu_affinity))}")
        self._set_threads(options.num_threads)
        if options.onnx_model:
            _check_onnx_runner(config)
            notes.append(f"the model runs in ONNX Runtime (onnx_model={options.onnx_model!r})")
        if model_config.dtype == "float16" and "avx512_fp16" not in self.flags and "amx_fp16" not in self.flags:
            notes.append("float16 is emulated on this CPU and slower than float32/bfloat16; consider dtype='auto'")
        return notes

    @staticmethod
    def _check_affinity(spec: object) -> list[int]:
        cpus = cpuinfo.parse_cpu_list(spec)  # type: ignore[arg-type]
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError(f"cpu_affinity={spec!r} is not supported on {py_platform.system()}; remove it")
        known = set(range(psutil.cpu_count(logical=True) or 1))
        if not set(cpus) <= known:
            raise ValueError(
                f"cpu_affinity={spec!r} names CPUs {sorted(set(cpus) - known)} that do not exist; "
                f"this machine has CPUs {_ranges(sorted(known))}"
            )
        return cpus

    @staticmethod
    def _set_threads(num_threads: int) -> None:
        import torch

        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)

    def create_model_runner(self, config: ResolvedConfig, model_config: ModelConfig) -> ModelRunner:
        import torch

        options = config.platform_options
        if isinstance(options, CPUOptions) and options.onnx_model:
            from kvik_cpu.onnx_runner import OnnxRuntimeRunner

            return OnnxRuntimeRunner(config, model_config, torch.device("cpu"), self)
        from kvik_cpu.runner import CPUModelRunner

        return CPUModelRunner(config, model_config, torch.device("cpu"), self)

    def describe(self) -> dict[str, str]:
        import torch

        cpus = cpuinfo.usable_cpus()
        interesting = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "bf16")
        memory = self.memory_info()
        return {
            **super().describe(),
            "cpu": cpuinfo.cpu_model_name(),
            "architecture": py_platform.machine(),
            "cpus": f"{len(cpus)} usable ({_ranges(cpus)}), {cpuinfo.physical_cores(cpus)} physical cores",
            "torch threads": str(torch.get_num_threads()),
            "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
            "flags": " ".join(f for f in interesting if f in self.flags) or "none of interest",
            "native bf16": "yes" if cpuinfo.has_fast_bf16(self.flags) else "no",
            "memory": f"{memory.total / GiB:.1f} GiB total, {memory.free / GiB:.1f} GiB available",
            "ipex": self.ipex.reason,
        }


def _check_onnx_runner(config: ResolvedConfig) -> None:
    """ValueError listing what the ONNX Runtime runner cannot do with this configuration."""
    options = config.platform_options
    assert isinstance(options, CPUOptions)
    clashes = [
        name
        for name, on in (
            ("compile_decode", options.compile_decode),
            ("kv_cache_dtype='fp8'", config.kv_cache_dtype != "auto"),
            ("tensor/pipeline parallelism", config.tensor_parallel_size * config.pipeline_parallel_size > 1),
            ("enable_lora", config.enable_lora),
            ("speculative decoding", config.speculative_config is not None),
            ("deterministic", config.deterministic),
            ("runner='pooling'", config.runner == "pooling"),
        )
        if on
    ]
    if clashes:
        raise ValueError(
            f"onnx_model runs the model in ONNX Runtime, which kvik cannot combine with {', '.join(clashes)}; "
            "drop those, or leave onnx_model unset to run kvik's torch model"
        )


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and cpu == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)
