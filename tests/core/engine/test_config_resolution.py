"""Config resolution: user options + platform defaults + plugin adjustments -> one frozen ResolvedConfig."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
from kvik.config import EngineConfig, ModelConfig, PlatformOptions, ResolvedConfig, SchedulingPolicy, WeightsMode
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.interface import MemoryInfo
from kvik.plugins.hookspecs import hookimpl
from kvik.testing.host_platform import HostCPUPlatform

REPO = Path(__file__).resolve().parents[3]


@dataclasses.dataclass(frozen=True, slots=True)
class _Options(PlatformOptions):
    turbo: bool = False
    lanes: int = 0  # 0: the platform picks


class _OptionsPlatform(HostCPUPlatform):
    name = "opts"
    default_max_num_seqs = 7
    default_async_scheduling = True
    options_type = _Options

    def resolve_options(self, options: dict[str, Any], config: EngineConfig) -> _Options:
        return _Options(turbo=options.get("turbo", False), lanes=options.get("lanes") or 4)

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 34, free=1 << 33)


@pytest.fixture
def model(tiny_model_dir) -> str:  # type: ignore[no-untyped-def]
    return str(tiny_model_dir("llama"))


def test_every_option_is_decided_and_frozen(model, kvik_plugin_manager) -> None:
    resolution = resolve_config(EngineConfig(model=model), HostCPUPlatform(), kvik_plugin_manager)
    config = resolution.config
    for f in dataclasses.fields(config):
        assert getattr(config, f.name) is not None, f.name
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (16, 256, 2048)
    assert config.scheduling_policy is SchedulingPolicy.FCFS and config.quantized_weights is WeightsMode.DEQUANTIZE
    assert config.tokenizer == model and config.platform == "host-cpu"
    assert config.attention_backend == "torch_ref" and resolution.sources["attention_backend"] == "platform host-cpu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_num_seqs = 1  # type: ignore[misc]
    assert isinstance(resolution.model_config, ModelConfig) and resolution.model_config.max_model_len > 0


def test_sources_say_who_decided(model, kvik_plugin_manager) -> None:
    tuner = types.ModuleType("tuner")
    tuner.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]

    @hookimpl
    def kvik_configure(config: EngineConfig) -> list[str]:
        config.max_num_batched_tokens = 96
        return ["max_num_batched_tokens=96"]

    tuner.kvik_configure = kvik_configure  # type: ignore[attr-defined]
    kvik_plugin_manager.register(tuner, "tuner", "kvik-tuner")
    user = EngineConfig(model=model, block_size=8, platform_options={"turbo": True}, seed=0)
    resolution = resolve_config(user, _OptionsPlatform(), kvik_plugin_manager)
    config, sources = resolution.config, resolution.sources
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (8, 7, 96)
    assert config.async_scheduling and config.platform_options == _Options(turbo=True, lanes=4)
    assert sources["block_size"] == "user" and sources["platform_options.turbo"] == "user"
    assert sources["max_num_seqs"] == "platform opts" and sources["platform_options.lanes"] == "platform opts"
    assert sources["max_num_batched_tokens"] == "plugin tuner"
    assert "seed" not in sources and "enable_prefix_caching" not in sources  # plain field defaults
    assert "tuner: max_num_batched_tokens=96" in resolution.notes
    report = resolution.report()
    assert re.search(r"max_num_seqs\s+7\s+\(platform opts\)", report)
    assert re.search(r"max_num_batched_tokens\s+96\s+\(plugin tuner\)", report)
    assert re.search(r"platform_options\.turbo\s+True\s+\(user\)", report)
    # The user's object is never changed.
    assert user.max_num_seqs is None and user.max_num_batched_tokens is None


def test_a_plugin_value_is_checked_like_a_users(model, kvik_plugin_manager) -> None:
    bad = types.ModuleType("bad")
    bad.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]
    bad.kvik_configure = hookimpl(lambda config: setattr(config, "max_num_seqs", 0))  # type: ignore[attr-defined]
    kvik_plugin_manager.register(bad, "bad", "kvik-bad")
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        resolve_config(EngineConfig(model=model), HostCPUPlatform(), kvik_plugin_manager)


def test_without_chunked_prefill_a_step_holds_the_longest_prompt(model, kvik_plugin_manager) -> None:
    resolution = resolve_config(
        EngineConfig(model=model, enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=200),
        HostCPUPlatform(),
        kvik_plugin_manager,
    )
    assert resolution.config.max_num_batched_tokens == 200
    assert resolution.sources["max_num_batched_tokens"].startswith("derived")


def test_memory_and_length_options(model, kvik_plugin_manager) -> None:
    def resolve(**options: Any) -> ResolvedConfig:
        return resolve_config(EngineConfig(model=model, **options), HostCPUPlatform(), kvik_plugin_manager).config

    assert (resolve().kv_cache_memory, resolve().num_kv_blocks, resolve().fit_max_model_len) == (0, 0, False)
    config = resolve(kv_cache_memory=1 << 20, num_kv_blocks=12, max_model_len="auto", long_prefill_token_threshold=8)
    assert (config.kv_cache_memory, config.num_kv_blocks, config.fit_max_model_len) == (1 << 20, 12, True)
    assert config.long_prefill_token_threshold == 8
    assert resolve(scheduling_policy="priority").scheduling_policy is SchedulingPolicy.PRIORITY
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be an int >= 0"):
        EngineConfig(model=model, long_prefill_token_threshold=-1)


def test_unknown_platform_option_names_the_known_ones(model, kvik_plugin_manager) -> None:
    with pytest.raises(ValueError, match=r"platform 'opts' has no option 'turbos'; its options are: turbo, lanes"):
        resolve_config(EngineConfig(model=model, platform_options={"turbos": 1}), _OptionsPlatform(), kvik_plugin_manager)


def test_trust_remote_code_reaches_the_format(model, kvik_plugin_manager) -> None:
    resolution = resolve_config(EngineConfig(model=model, trust_remote_code=True), HostCPUPlatform(), kvik_plugin_manager)
    assert resolution.config.trust_remote_code and resolution.model_format.trust_remote_code


def test_long_prefill_token_threshold_reaches_the_scheduler(model, kvik_plugin_manager) -> None:
    from kvik.engine.llm_engine import LLMEngine
    from kvik.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(model=model, device="host-cpu", num_kv_blocks=64, long_prefill_token_threshold=8),
        _manager_with_host(kvik_plugin_manager),
    )
    assert engine.scheduler.long_prefill_token_threshold == 8
    engine.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=1))
    assert engine.scheduler.schedule().num_batched_tokens == 8


def _manager_with_host(manager):  # type: ignore[no-untyped-def]
    host = types.ModuleType("host")
    host.KVIK_PLUGIN_API = ">=2.0,<3"  # type: ignore[attr-defined]
    host.kvik_register_platforms = hookimpl(  # type: ignore[attr-defined]
        lambda register: register("host-cpu", "kvik.testing.host_platform:HostCPUPlatform")
    )
    manager.register(host, "host", "kvik-host")
    return manager


def test_no_config_fallbacks_downstream() -> None:
    """Every default has one home: runners, platforms and the server never re-default a config value."""
    pattern = re.compile(r"(config|cfg)\.\w+ or |default_block_size(?! ?=)|max_num_seqs or|\.extra\b")
    offenders = []
    for root in ("core/kvik/worker", "core/kvik/engine", "core/kvik/attention", "platforms", "server", "attention_backends"):
        for path in (REPO / root).rglob("*.py"):
            if path.name == "config_resolution.py":  # the one place that decides
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "ClassVar" not in line and "self.default_block_size" not in line:
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_resolution_needs_no_torch(model) -> None:
    """Config resolution reads checkpoint metadata only: it runs with torch blocked."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        from kvik.config import EngineConfig
        from kvik.engine.config_resolution import resolve_config
        import types
        from kvik.attention.backend import AttentionBackend
        from kvik.platforms.interface import MemoryInfo, Platform
        from kvik.plugins.hookspecs import hookimpl
        from kvik.plugins.manager import PluginManager
        import kvik.builtin

        class NumpyAttention(AttentionBackend):  # a torch-free backend to choose
            name = "numpy_attention"
            def forward(self, query, key, value, kv_cache, metadata): raise NotImplementedError

        class Plain(Platform):
            name = "plain"
            device_type = "cpu"
            attention_backends = ("numpy_attention",)
            @classmethod
            def is_available(cls): return True
            def memory_info(self): return MemoryInfo(total=1 << 30, free=1 << 29)
            def create_model_runner(self, config, model_config): raise NotImplementedError

        manager = PluginManager(load_entrypoints=False)
        manager.register(kvik.builtin, "builtin", "kvik-core")
        numpy_plugin = types.ModuleType("numpy_plugin")
        numpy_plugin.KVIK_PLUGIN_API = ">=2.0,<3"
        numpy_plugin.kvik_register_attention_backends = hookimpl(
            lambda register: register("numpy_attention", "__main__:NumpyAttention")
        )
        manager.register(numpy_plugin, "numpy_plugin", "numpy-plugin")
        resolution = resolve_config(EngineConfig(model={model!r}), Plain(), manager)
        assert resolution.config.attention_backend == "numpy_attention"
        assert "torch" not in [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]
        print(resolution.config.max_num_seqs, resolution.model_config.architecture)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["256", "LlamaForCausalLM"]
