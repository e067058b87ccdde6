"""The "apple" platform: MLX on Apple Silicon (Metal), or MLX's CPU build elsewhere.

Selection rule (documented in platforms/apple/README.md):

* ``--device apple`` / ``--device mlx`` picks it wherever ``mlx.core`` imports,
  including Linux with ``pip install "mlx[cpu]"``.
* Auto-selection prefers it over the torch CPU platform only when MLX sees a
  Metal GPU. Without Metal its priority is below the CPU platform's 0, so a
  Linux box with both installed keeps auto-selecting torch CPU.

``priority`` stays a class attribute (the selector reads ``cls.priority``) but
is computed on access by a descriptor, because whether Metal exists is a fact
about the machine, not about the class.
"""

from __future__ import annotations

import functools
import importlib.util
import platform as _pyplatform
from typing import TYPE_CHECKING, Any, ClassVar

from kvik.config import LoadFormat, WeightsMode
from kvik.platforms.interface import MemoryInfo, Platform

if TYPE_CHECKING:
    from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
    from kvik.worker.interface import ModelRunner

# Above the torch CPU platform (0) and below CUDA-class accelerators.
METAL_PRIORITY = 50
# Below the torch CPU platform: MLX's CPU build is a test vehicle, not a default.
NO_METAL_PRIORITY = -10
GiB = 1 << 30
# Without Metal, MLX runs on the host CPU: use kvik-cpu's step sizes and a
# KV pool of min(1 GiB, 1/4 of available RAM). kvik-cpu allows 4 GiB, but
# torch.zeros gets lazily committed zero pages while mx.zeros writes (commits)
# the whole pool up front, and the CPU build is a test vehicle.
CPU_MAX_NUM_SEQS = 32
CPU_MAX_NUM_BATCHED_TOKENS = 1024
CPU_KV_CACHE_CAP = 1 * GiB


@functools.cache
def mlx_import_error() -> str | None:
    """None when ``mlx.core`` imports; otherwise why it does not (cached: ~10 ms once)."""
    if importlib.util.find_spec("mlx") is None:
        return "the mlx package is not installed (pip install mlx on a Mac, 'mlx[cpu]' on Linux)"
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:  # a broken or backend-less install (mlx without mlx-cpu on Linux)
        return f"mlx is installed but mlx.core does not import: {type(exc).__name__}: {exc}"
    return None


def metal_available() -> bool:
    """Whether MLX can use a Metal GPU here. Never raises."""
    if mlx_import_error() is not None:
        return False
    try:
        import mlx.core as mx

        return bool(mx.metal.is_available())
    except Exception:
        return False


class _MetalPriority:
    """Descriptor: ``ApplePlatform.priority`` is high only where Metal exists."""

    def __get__(self, obj: Any, owner: type | None = None) -> int:
        return METAL_PRIORITY if metal_available() else NO_METAL_PRIORITY


class ApplePlatform(Platform):
    name: ClassVar[str] = "apple"
    aliases: ClassVar[tuple[str, ...]] = ("mlx",)
    device_type: ClassVar[str] = "mlx"
    priority: ClassVar[int] = _MetalPriority()  # type: ignore[assignment]
    attention_backends: ClassVar[tuple[str, ...]] = ("mlx_paged",)
    # GGUF is the only packed format the MLX loader reads (Q4_0, Q4_1, Q8_0 stay packed).
    quantization_methods: ClassVar[tuple[str, ...] | None] = ("gguf",)
    supported_dtypes: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")
    default_block_size: ClassVar[int] = 16

    @classmethod
    def is_available(cls) -> bool:
        return mlx_import_error() is None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return mlx_import_error()

    def default_dtype(self, model_dtype: str, quantization: str | None = None) -> str:
        # MLX's CPU build runs half-precision matmuls far slower than float32;
        # on Metal the checkpoint's own dtype is the fast one.
        if not metal_available():
            return "float32"
        return model_dtype if model_dtype in self.supported_dtypes else "float16"

    def memory_info(self) -> MemoryInfo:
        """Unified memory: MLX's recommended working set on a Mac, RAM elsewhere."""
        import psutil

        vm = psutil.virtual_memory()
        if metal_available():
            import mlx.core as mx

            info = mx.device_info()
            total = int(info.get("max_recommended_working_set_size", info.get("memory_size", vm.total)))
            free = max(0, min(total - int(mx.get_active_memory()), int(vm.available)))
            return MemoryInfo(total=total, free=free)
        return MemoryInfo(total=int(vm.total), free=int(vm.available))

    def engine_defaults(self, config: EngineConfig, model_config: ModelConfig) -> dict[str, Any]:
        """On MLX's CPU build (no Metal): CPU-sized batches and a KV budget from available RAM."""
        defaults = super().engine_defaults(config, model_config)
        if not metal_available():
            defaults["max_num_seqs"] = CPU_MAX_NUM_SEQS
            defaults["max_num_batched_tokens"] = CPU_MAX_NUM_BATCHED_TOKENS
            if config.kv_cache_memory is None and config.num_kv_blocks is None:
                available = self.memory_info().free
                defaults["kv_cache_memory"] = max(GiB // 4, min(CPU_KV_CACHE_CAP, available // 4))
        return defaults

    def configure(self, config: ResolvedConfig, model_config: ModelConfig) -> list[str]:
        if config.load_format is not LoadFormat.AUTO:
            raise ValueError(f"load_format={config.load_format.value!r} is not supported by the apple (MLX) platform")
        if config.attention_backend not in self.attention_backends:
            raise ValueError(
                f"attention_backend {config.attention_backend!r} cannot run on the apple (MLX) platform; "
                f"it runs {', '.join(self.attention_backends)} (leave attention_backend unset)"
            )
        return []

    def quantized_weights_mode(self, config: EngineConfig, method: str) -> WeightsMode:
        # On Metal MLX's quantized matmul is the fast path; on the CPU build the
        # dequantized float32 model is both faster and bit-comparable with torch.
        return WeightsMode.QUANTIZED if metal_available() else WeightsMode.DEQUANTIZE

    def create_model_runner(self, config: ResolvedConfig, model_config: ModelConfig) -> ModelRunner:
        from kvik_apple.runner import MLXModelRunner

        return MLXModelRunner(config, model_config, self)

    def describe(self) -> dict[str, str]:
        facts = super().describe()
        if mlx_import_error() is None:
            import mlx.core as mx

            facts["mlx"] = str(mx.__version__)
            facts["mlx_device"] = str(mx.default_device())
            facts["metal"] = str(metal_available())
        facts["machine"] = f"{_pyplatform.system()} {_pyplatform.machine()}"
        return facts
