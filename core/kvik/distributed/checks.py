"""Start-up checks for a tensor/pipeline-parallel configuration: every problem in one message.

Run during config resolution (metadata only, no weights, no worker started), so a
configuration that cannot work fails in a second with what to change, not minutes later
in a worker with a shape error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvik.plugins.registry import PluginError

if TYPE_CHECKING:
    from kvik.config import ModelConfig, ResolvedConfig
    from kvik.platforms.interface import Platform
    from kvik.plugins.manager import PluginManager


def parallel_problems(
    config: ResolvedConfig, model_config: ModelConfig, platform: Platform, manager: PluginManager
) -> list[str]:
    """Why ``config``'s parallel layout cannot run this model on this platform (empty: it can)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    problems: list[str] = []
    executor = config.distributed_executor_backend
    if executor not in manager.executors.names():
        known = ", ".join(sorted(manager.executors.names()))
        problems.append(f"distributed_executor_backend={executor!r} is not registered (known: {known})")
    offset = config.device_offset
    if executor != "ray" and offset and platform.device_count() is not None:
        count = platform.device_count()
        if count is not None and offset + tp * pp > count:
            problems.append(f"data-parallel replica at device {offset} needs devices {offset}..{offset + tp * pp - 1}; "
                            f"this host has {count}")  # fmt: skip
    if tp * pp == 1:
        return problems
    if executor == "uni":
        problems.append(
            f"the 'uni' executor runs one rank, not {tp * pp}; use distributed_executor_backend='mp' or 'ray'"
        )
    if platform.distributed_backend is None:
        problems.append(f"platform {platform.name!r} runs one device per engine (no torch.distributed backend)")
    elif executor != "ray":  # Ray places ranks on any host of its cluster
        count = platform.device_count()
        if count is not None and tp * pp > count:
            problems.append(f"{tp * pp} ranks (tensor {tp} x pipeline {pp}) need {tp * pp} {platform.name} devices; "
                            f"this host has {count}")  # fmt: skip
    arch = model_config.architecture
    try:
        model_cls = manager.models.get(arch)
    except PluginError:
        model_cls = None
    # Declared by the class itself, never inherited: a subclass may build modules that are not split.
    declared = vars(model_cls) if model_cls is not None else {}
    if tp > 1 and not declared.get("supports_tensor_parallel", False):
        problems.append(f"{arch} does not support tensor parallelism yet (Llama, Mistral, Qwen2 and Qwen3 do)")
    if pp > 1 and not declared.get("supports_pipeline_parallel", False):
        problems.append(f"{arch} does not support pipeline parallelism yet (Llama, Mistral, Qwen2 and Qwen3 do)")
    if tp > 1:
        hf = model_config.hf_config
        heads, kv = model_config.num_heads, model_config.num_kv_heads
        if heads % tp:
            problems.append(f"{heads} attention heads are not divisible by tensor_parallel_size={tp}")
        if (kv % tp) if kv >= tp else (tp % kv):
            problems.append(f"{kv} key/value heads can neither be split nor replicated evenly over {tp} ranks")
        if model_config.vocab_size % tp:
            problems.append(f"the vocabulary ({model_config.vocab_size}) is not divisible by tensor_parallel_size={tp}")
        inter = getattr(hf, "intermediate_size", None)
        if isinstance(inter, int) and inter % tp:
            problems.append(f"the MLP's intermediate size ({inter}) is not divisible by tensor_parallel_size={tp}")
        if model_config.quantization is not None:
            problems.append(f"{model_config.quantization!r}-quantized checkpoints are not split across devices yet")
    if pp > model_config.num_layers:
        problems.append(f"pipeline_parallel_size={pp} exceeds the model's {model_config.num_layers} layers")
    if config.runner == "pooling":
        problems.append("pooling models run on one device")
    return problems


def check_parallel(
    config: ResolvedConfig, model_config: ModelConfig, platform: Platform, manager: PluginManager
) -> None:
    """Raise one ``ValueError`` naming every problem of the parallel layout (see :func:`parallel_problems`)."""
    problems = parallel_problems(config, model_config, platform, manager)
    if problems:
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        raise ValueError(
            f"cannot run tensor_parallel_size={tp}, pipeline_parallel_size={pp} with executor "
            f"{config.distributed_executor_backend!r}: " + "; ".join(problems)
        )
