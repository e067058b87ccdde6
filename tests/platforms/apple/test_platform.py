"""Platform selection and configuration, with Metal faked present or absent."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core", reason="kvik-apple tests need MLX (pip install 'mlx[cpu]' on Linux)")

from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.selector import resolve_platform
from kvik.plugins.registry import PluginError
from kvik_apple import platform as apple


@pytest.fixture
def metal(monkeypatch):
    """metal(True/False) fakes whether MLX sees a Metal GPU."""

    def fake(present: bool) -> None:
        monkeypatch.setattr(apple, "metal_available", lambda: present)

    return fake


def test_auto_prefers_cpu_without_metal(metal, monkeypatch):
    monkeypatch.delenv("KVIK_DEVICE", raising=False)
    metal(False)
    assert apple.ApplePlatform.priority < 0
    assert resolve_platform().name == "cpu"


def test_auto_prefers_apple_with_metal(metal, monkeypatch):
    monkeypatch.delenv("KVIK_DEVICE", raising=False)
    metal(True)
    assert apple.ApplePlatform.priority > 0
    assert resolve_platform().name == "apple"


@pytest.mark.parametrize("device", ["apple", "mlx"])
def test_forced_by_name_or_alias_without_metal(metal, device):
    metal(False)
    assert isinstance(resolve_platform(device), apple.ApplePlatform)


def test_forcing_without_mlx_explains(monkeypatch):
    monkeypatch.setattr(apple.ApplePlatform, "is_available", classmethod(lambda cls: False))
    monkeypatch.setattr(apple.ApplePlatform, "unavailable_reason", classmethod(lambda cls: "the mlx package is gone"))
    with pytest.raises(PluginError, match="mlx package is gone"):
        resolve_platform("apple")


def test_real_probe_on_this_machine():
    import mlx.core as mx

    assert apple.ApplePlatform.is_available() and apple.mlx_import_error() is None
    assert apple.metal_available() == mx.metal.is_available()


@pytest.fixture
def resolve(tmp_path, kvik_plugin_manager):
    from kvik.testing.tiny_models import tiny_config

    path = tmp_path / "config-only"  # resolution reads the config alone (and this needs no torch)
    tiny_config("llama").save_pretrained(path)

    def run(**options):  # type: ignore[no-untyped-def]
        return resolve_config(EngineConfig(model=str(path), **options), apple.ApplePlatform(), kvik_plugin_manager)

    return run


def test_cpu_build_defaults(metal, resolve):
    metal(False)
    resolution = resolve()
    config = resolution.config
    assert config.block_size == 16
    assert config.max_num_seqs == apple.CPU_MAX_NUM_SEQS
    assert 0 < config.kv_cache_memory <= apple.CPU_KV_CACHE_CAP
    assert resolution.sources["kv_cache_memory"] == "platform apple"
    platform = apple.ApplePlatform()
    assert platform.quantized_weights_mode(EngineConfig(), "gguf") == "dequantize"
    assert platform.default_dtype("bfloat16") == "float32"


def test_metal_defaults(metal, resolve):
    metal(True)
    config = resolve().config
    assert config.max_num_seqs == 256 and config.kv_cache_memory == 0
    platform = apple.ApplePlatform()
    assert platform.quantized_weights_mode(EngineConfig(), "gguf") == "quantized"
    assert platform.default_dtype("bfloat16") == "bfloat16"


def test_rejects_a_torch_attention_backend(resolve):
    # With torch installed the selector refuses it (the apple platform prefers mlx_paged); without
    # torch (KVIK_TEST_WITHOUT_TORCH) it cannot even be imported, and the error says so.
    with pytest.raises((ValueError, PluginError), match=r"torch_ref|mlx_paged") as info:
        resolve(attention_backend="torch_ref")
    assert "torch_ref" in str(info.value)


def test_num_threads_is_ignored_with_a_note(resolve):
    assert "num_threads=2 is ignored: platform 'apple' does not use it" in resolve(num_threads=2).notes


def test_memory_info_is_host_ram_without_metal(metal):
    import psutil

    metal(False)
    info = apple.ApplePlatform().memory_info()
    assert info.total == psutil.virtual_memory().total and 0 < info.free <= info.total
    facts = apple.ApplePlatform().describe()
    assert facts["platform"] == "apple" and facts["device_type"] == "mlx" and "mlx" in facts


def test_entry_point_registers_platform_and_backend():
    """The installed distribution is found through the ``kvik`` entry-point group."""
    from importlib.metadata import entry_points

    from kvik.plugins.manager import PluginManager

    (ep,) = [ep for ep in entry_points(group="kvik") if ep.name == "apple"]
    assert ep.value == "kvik_apple.plugin"
    manager = PluginManager(load_entrypoints=True)
    assert manager.platforms.get("apple") is apple.ApplePlatform
    assert manager.attention_backends.get("mlx_paged").name == "mlx_paged"


def test_core_platform_conformance():
    from kvik.testing.conformance.platform import check_platform

    assert check_platform(apple.ApplePlatform) is True
