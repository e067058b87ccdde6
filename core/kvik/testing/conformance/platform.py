"""Conformance checks for platform plugins.

Use in a plugin's tests::

    from kvik.testing.conformance.platform import check_platform

    def test_conformance():
        check_platform(MyPlatform)

Every problem found is collected and reported at once in one AssertionError.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvik.config import (
    EngineConfig,
    LoadFormat,
    ModelConfig,
    PlatformOptions,
    ResolvedConfig,
    SchedulingPolicy,
    WeightsMode,
)
from kvik.platforms.interface import MemoryInfo, Platform

_DTYPES = ("float32", "float16", "bfloat16")


def _class_attribute_problems(cls: type[Any]) -> list[str]:
    problems: list[str] = []
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name and name == name.strip().lower()):
        problems.append(f"name must be a non-empty lower-case string (users type it), got {name!r}")
    if name == "auto":
        problems.append("name 'auto' is reserved for auto-selection")
    aliases = getattr(cls, "aliases", ())
    if not (isinstance(aliases, tuple) and all(isinstance(a, str) and a == a.lower() for a in aliases)):
        problems.append(f"aliases must be a tuple of lower-case strings, got {aliases!r}")
    if not (isinstance(getattr(cls, "device_type", None), str) and cls.device_type):
        problems.append(
            f"device_type must be a torch device string or 'mlx', got {getattr(cls, 'device_type', None)!r}"
        )
    if not isinstance(cls.priority, int) or isinstance(cls.priority, bool):
        problems.append(f"priority must be an int, got {cls.priority!r}")
    backends = cls.attention_backends
    if not (isinstance(backends, tuple) and backends and all(isinstance(b, str) and b for b in backends)):
        problems.append(f"attention_backends must be a non-empty tuple of backend names, got {backends!r}")
    methods = cls.quantization_methods
    if methods is not None and not (isinstance(methods, tuple) and all(isinstance(m, str) for m in methods)):
        problems.append(f"quantization_methods must be None or a tuple of names, got {methods!r}")
    dtypes = cls.supported_dtypes
    if not (isinstance(dtypes, tuple) and dtypes and set(dtypes) <= set(_DTYPES)):
        problems.append(f"supported_dtypes must be a non-empty tuple drawn from {_DTYPES}, got {dtypes!r}")
    block = cls.default_block_size
    if not (isinstance(block, int) and block > 0 and block & (block - 1) == 0):
        problems.append(f"default_block_size must be a positive power of two, got {block!r}")
    return problems


def _instance_problems(platform: Platform) -> list[str]:
    problems: list[str] = []
    memory = platform.memory_info()
    if not isinstance(memory, MemoryInfo):
        problems.append(f"memory_info() must return MemoryInfo, got {type(memory).__name__}")
    elif not (isinstance(memory.total, int) and memory.total > 0 and 0 <= memory.free <= memory.total):
        problems.append(f"memory_info() must satisfy 0 <= free <= total and total > 0 (bytes), got {memory}")
    for model_dtype in _DTYPES:
        chosen = platform.default_dtype(model_dtype)
        if chosen not in platform.supported_dtypes:
            problems.append(f"default_dtype({model_dtype!r}) = {chosen!r} is not in supported_dtypes")
    model_config = _probe_model_config()
    user = EngineConfig(model="probe")
    defaults = platform.engine_defaults(user, model_config)
    for field in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        value = defaults.get(field)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            problems.append(f"engine_defaults() must give {field} a positive int, got {value!r}")
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(EngineConfig)})
    if unknown:
        problems.append(f"engine_defaults() names options EngineConfig does not have: {unknown}")
    options = platform.resolve_options({}, user)
    if not isinstance(options, platform.options_type):
        problems.append(f"resolve_options() must return {platform.options_type.__name__}, got {options!r}")
    else:
        resolved = _probe_resolved(platform, defaults, options)
        notes = platform.configure(resolved, model_config)
        if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
            problems.append(f"configure() must return a list of note strings, got {notes!r}")
    chosen_mode = platform.quantized_weights_mode(user, "gguf")
    if chosen_mode not in tuple(WeightsMode):
        problems.append(f"quantized_weights_mode() must return a WeightsMode, got {chosen_mode!r}")
    described = platform.describe()
    if not (
        isinstance(described, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in described.items())
    ):
        problems.append(f"describe() must return dict[str, str], got {described!r}")
    elif described.get("platform") != platform.name:
        problems.append(f"describe()['platform'] must be the platform name {platform.name!r}")
    return problems


def _probe_model_config() -> ModelConfig:
    """A small Llama-shaped model's facts, for the checks that need a model."""
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)  # fmt: skip
    return ModelConfig(
        architecture="LlamaForCausalLM", hf_config=hf, dtype="float32", num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, hidden_size=64, vocab_size=256, max_position_embeddings=512, max_model_len=512,
    )  # fmt: skip


def _probe_resolved(platform: Platform, defaults: dict[str, Any], options: PlatformOptions) -> ResolvedConfig:
    return ResolvedConfig(
        model="probe", model_name="probe", tokenizer="probe", trust_remote_code=False, platform=platform.name,
        block_size=defaults["block_size"], max_num_seqs=defaults["max_num_seqs"],
        max_num_batched_tokens=defaults["max_num_batched_tokens"], enable_prefix_caching=True,
        enable_chunked_prefill=True, long_prefill_token_threshold=0, scheduling_policy=SchedulingPolicy.FCFS,
        num_kv_blocks=0, kv_cache_memory=0, gpu_memory_utilization=0.9, fit_max_model_len=False,
        quantized_weights=WeightsMode.DEQUANTIZE, load_format=LoadFormat.AUTO, attention_backend=platform.attention_backends[0], enforce_eager=False,
        async_scheduling=bool(defaults.get("async_scheduling", False)), seed=0, platform_options=options,
    )  # fmt: skip


def check_platform(platform_cls: type[Platform]) -> bool:
    """Check a Platform subclass against the interface contract; return whether it is available here.

    Always checked: the class attributes, and that ``is_available()`` returns a
    bool without raising (and ``unavailable_reason()`` explains a False). When
    available, an instance is built and ``memory_info``, ``default_dtype``,
    ``engine_defaults`` (positive block size and batch limits, only known options),
    ``resolve_options``, ``configure`` (on a config built from those defaults),
    ``quantized_weights_mode`` and ``describe`` are checked. Process-wide state ``configure`` may change
    (torch's thread count) is restored afterwards.
    """
    try:
        import torch
    except ImportError:  # a platform that runs without torch (MLX): no torch state to restore
        torch = None  # type: ignore[assignment]

    if not (isinstance(platform_cls, type) and issubclass(platform_cls, Platform)):
        raise AssertionError(f"{platform_cls!r} is not a subclass of kvik.platforms.Platform")
    problems = _class_attribute_problems(platform_cls)
    available = False
    try:
        available = platform_cls.is_available()
    except Exception as exc:
        problems.append(f"is_available() must never raise; it raised {type(exc).__name__}: {exc}")
    else:
        if not isinstance(available, bool):
            problems.append(f"is_available() must return a bool, got {available!r}")
            available = False
        elif not available and not platform_cls.unavailable_reason():
            problems.append("unavailable_reason() must explain why is_available() is False (users see it)")
    if available and not problems:
        threads = torch.get_num_threads() if torch is not None else 0
        try:
            problems += _instance_problems(platform_cls())
        finally:
            if torch is not None:
                torch.set_num_threads(threads)
    if problems:
        raise AssertionError(f"platform {platform_cls.__name__} does not conform:\n  - " + "\n  - ".join(problems))
    return available
