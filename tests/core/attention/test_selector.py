"""select_attention_backend: the user's choice, else the platform's first valid preference."""

from __future__ import annotations

import types

import kvik.builtin
import pytest
from kvik.attention.selector import select_attention_backend
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.config import EngineConfig
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginManager


class Only128(TorchRefAttentionBackend):
    name = "only128"
    supported_head_sizes = (128,)


class NoWindow(TorchRefAttentionBackend):
    name = "no_window"
    supports_sliding_window = False


class NoCap(TorchRefAttentionBackend):
    name = "no_cap"
    supports_logits_soft_cap = False


class NoFp8(TorchRefAttentionBackend):
    name = "no_fp8"
    supported_kv_cache_dtypes = ("auto",)


class FakePlatform(Platform):
    name = "fake"
    device_type = "cpu"
    attention_backends = ("only128", "no_window", "torch_ref")

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 30, free=1 << 30)

    def create_model_runner(self, config, model_config):  # pragma: no cover - not used here
        raise NotImplementedError


@pytest.fixture
def manager() -> PluginManager:
    pm = PluginManager(load_entrypoints=False)
    pm.register(kvik.builtin, "kvik.builtin")
    plugin = types.ModuleType("fake_backends")
    plugin.KVIK_PLUGIN_API = ">=2.0,<3"

    @hookimpl
    def kvik_register_attention_backends(register) -> None:
        register("only128", f"{__name__}:Only128")
        register("no_window", f"{__name__}:NoWindow")
        register("no_cap", f"{__name__}:NoCap")
        register("no_fp8", f"{__name__}:NoFp8")

    plugin.kvik_register_attention_backends = kvik_register_attention_backends
    pm.register(plugin, "fake_backends")
    return pm


def select(manager: PluginManager, head_size: int = 64, window: int | None = None, **options) -> type:
    config = EngineConfig(block_size=16, **options)
    return select_attention_backend(FakePlatform(), config, head_size, "float32", window, manager)


def test_first_valid_preference_wins(manager: PluginManager) -> None:
    assert select(manager, head_size=128) is Only128
    assert select(manager, head_size=64) is NoWindow
    assert select(manager, head_size=64, window=8) is TorchRefAttentionBackend


def test_user_choice_is_used_or_refused_with_reasons(manager: PluginManager) -> None:
    assert select(manager, head_size=128, attention_backend="torch_ref") is TorchRefAttentionBackend
    with pytest.raises(ValueError, match=r"'only128' cannot run .*head size 64 not in \(128,\)"):
        select(manager, head_size=64, attention_backend="only128")


def test_no_valid_backend_lists_every_candidate(manager: PluginManager) -> None:
    class Strict(FakePlatform):
        attention_backends = ("only128", "no_window", "missing")

    with pytest.raises(ValueError) as info:
        select_attention_backend(Strict(), EngineConfig(block_size=16), 64, "float32", 8, manager)
    message = str(info.value)
    assert "only128: head size 64 not in (128,)" in message
    assert "no_window: sliding window attention is not supported" in message
    assert "missing: unknown attention backend 'missing'" in message


def test_soft_capped_models_skip_backends_without_the_capability(manager: PluginManager) -> None:
    class Prefers(FakePlatform):
        attention_backends = ("no_cap", "torch_ref")

    def pick(attention_backend: str = "", cap: float | None = None) -> type:
        config = EngineConfig(block_size=16, attention_backend=attention_backend)
        return select_attention_backend(Prefers(), config, 64, "float32", None, manager, logits_soft_cap=cap)

    assert pick() is NoCap
    assert pick(cap=50.0) is TorchRefAttentionBackend
    with pytest.raises(ValueError, match=r"'no_cap' cannot run .*soft-capping \(attn_logit_softcapping=50.0\)"):
        pick("no_cap", cap=50.0)
    with pytest.raises(ValueError, match="does not support attention logit soft-capping"):
        NoCap(4, 64, 4, 0.125, None, logits_soft_cap=50.0)


def test_an_fp8_kv_cache_skips_backends_that_cannot_hold_it(manager: PluginManager) -> None:
    class Prefers(FakePlatform):
        attention_backends = ("no_fp8", "torch_ref")

    def pick(kv_cache_dtype: str, attention_backend: str = "") -> type:
        config = EngineConfig(block_size=16, kv_cache_dtype=kv_cache_dtype, attention_backend=attention_backend)
        return select_attention_backend(Prefers(), config, 64, "float32", None, manager)

    assert pick("auto") is NoFp8
    assert pick("fp8") is TorchRefAttentionBackend  # torch_ref holds float8 e4m3
    with pytest.raises(ValueError, match=r"'no_fp8' cannot run .*kv_cache_dtype='fp8_e4m3' is not supported "
                                         r"\(its cache holds the model dtype only\); use kv_cache_dtype='auto'"):
        pick("fp8_e4m3", attention_backend="no_fp8")
