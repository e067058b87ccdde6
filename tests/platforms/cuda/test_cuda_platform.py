"""The "cuda" platform: availability probes, selection and configuration.

The probes are faked (this machine has a CPU-only torch); what runs on a real
GPU is covered by test_cuda_runner.py's GPU tests.
"""

from __future__ import annotations

import types

import kvik_cuda.platform as cuda_platform
import pytest
import torch
from kvik.attention.selector import select_attention_backend
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.interface import MemoryInfo
from kvik.platforms.selector import resolve_platform
from kvik.plugins.registry import PluginError
from kvik.testing.conformance.platform import check_platform
from kvik_cuda import plugin as cuda_plugin
from kvik_cuda.platform import CUDAPlatform, GPUOptions
from kvik_cuda.runner import capture_sizes


def fake_gpu(monkeypatch: pytest.MonkeyPatch, build: str | None, visible: bool, bf16: bool = True) -> None:
    """Make torch look like a `build` build that sees (or not) one 80 GiB GPU with 132 SMs."""
    monkeypatch.setattr(cuda_platform, "torch_gpu_build", lambda: build)
    monkeypatch.setattr(cuda_platform, "torch_gpu_visible", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 << 30, 80 << 30))
    props = types.SimpleNamespace(name="Fake H100", major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_conformance_with_a_faked_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "cuda", True)
    assert check_platform(CUDAPlatform) is True


def test_conformance_on_this_machine() -> None:
    assert check_platform(CUDAPlatform) is torch.cuda.is_available()


@pytest.mark.parametrize(
    "build,visible,available",
    [("cuda", True, True), ("cuda", False, False), ("hip", True, False), (None, False, False)],
)
def test_available_only_on_a_cuda_build_that_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch, build: str | None, visible: bool, available: bool
) -> None:
    fake_gpu(monkeypatch, build, visible)
    assert CUDAPlatform.is_available() is available
    reason = CUDAPlatform.unavailable_reason()
    assert (reason is None) is available
    if build == "hip":
        assert "device='rocm'" in reason
    if build is None:
        assert "CPU-only build" in reason


def test_probe_errors_read_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("driver too old")

    monkeypatch.setattr(cuda_platform, "torch_gpu_build", lambda: "cuda")
    monkeypatch.setattr(cuda_platform, "torch_gpu_visible", broken)
    assert CUDAPlatform.is_available() is False
    assert "driver too old" in CUDAPlatform.unavailable_reason()


def test_this_machine_reports_unavailable_with_a_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert CUDAPlatform.is_available() is False
    assert CUDAPlatform.unavailable_reason()


def test_auto_selection_prefers_cuda_and_forcing_it_without_gpu_fails(
    kvik_plugin_manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvik_plugin_manager.register(cuda_plugin, "cuda", "kvik-cuda")
    fake_gpu(monkeypatch, "cuda", True)
    platform = resolve_platform("auto", kvik_plugin_manager)
    assert isinstance(platform, CUDAPlatform) and platform.priority == 100
    assert isinstance(resolve_platform("nvidia", kvik_plugin_manager), CUDAPlatform)  # alias
    fake_gpu(monkeypatch, "cuda", False)
    with pytest.raises(PluginError, match="not available on this machine"):
        resolve_platform("cuda", kvik_plugin_manager)


def _resolve(platform, path, manager, **options):  # type: ignore[no-untyped-def]
    return resolve_config(EngineConfig(model=str(path), **options), platform, manager)


def test_resolution_takes_gpu_defaults_and_keeps_user_values(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir, kvik_plugin_manager
) -> None:
    fake_gpu(monkeypatch, "cuda", True)
    path = tiny_model_dir("llama")
    resolution = _resolve(CUDAPlatform(), path, kvik_plugin_manager)
    config = resolution.config
    assert (config.block_size, config.max_num_batched_tokens, config.max_num_seqs) == (16, 8192, 256)
    assert config.async_scheduling and config.platform_options == GPUOptions(fused_layers=True)
    assert resolution.sources["max_num_batched_tokens"] == "platform cuda"
    resolution = _resolve(
        CUDAPlatform(), path, kvik_plugin_manager, block_size=32, max_num_batched_tokens=1024, max_num_seqs=8,
        enforce_eager=True, async_scheduling=False, platform_options={"fused_layers": False},
    )  # fmt: skip
    config = resolution.config
    assert (config.block_size, config.max_num_batched_tokens, config.max_num_seqs) == (32, 1024, 8)
    assert not config.async_scheduling and not config.platform_options.fused_layers
    assert resolution.sources["block_size"] == resolution.sources["platform_options.fused_layers"] == "user"
    assert "enforce_eager: CUDA graphs are off" in resolution.notes


def test_bf16_refused_with_advice_on_gpus_without_it(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir, kvik_plugin_manager
) -> None:
    fake_gpu(monkeypatch, "cuda", True, bf16=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ValueError, match="dtype='float16'"):
        _resolve(CUDAPlatform(), tiny_model_dir("llama"), kvik_plugin_manager, dtype="bfloat16")


@pytest.mark.parametrize(
    "checkpoint,bf16,expected",
    [
        ("bfloat16", True, "bfloat16"),
        ("float32", True, "bfloat16"),
        ("float16", True, "float16"),
        ("bfloat16", False, "float16"),
    ],
)
def test_default_dtype(monkeypatch: pytest.MonkeyPatch, checkpoint: str, bf16: bool, expected: str) -> None:
    fake_gpu(monkeypatch, "cuda", True, bf16=bf16)
    assert CUDAPlatform().default_dtype(checkpoint) == expected


def test_memory_info_from_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "cuda", True)
    assert CUDAPlatform().memory_info() == MemoryInfo(total=80 << 30, free=70 << 30)


def test_describe_reports_nccl_and_why_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, None, False)
    info = CUDAPlatform().describe()
    assert info["platform"] == "cuda" and "nccl" in info and "triton" in info
    assert info["status"].startswith("unavailable: ")
    fake_gpu(monkeypatch, "cuda", True)
    info = CUDAPlatform().describe()
    assert info["device"] == "Fake H100 (#0)" and info["compute capability"] == "9.0" and "status" not in info


def test_attention_prefers_triton_then_torch_ref(kvik_plugin_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvik_triton_attention import plugin as triton_plugin

    kvik_plugin_manager.register(triton_plugin, "triton", "kvik-triton-attention")
    platform = CUDAPlatform()
    config = EngineConfig(block_size=16)
    chosen = select_attention_backend(platform, config, 128, "bfloat16", None, kvik_plugin_manager)
    expected = "triton" if __import__("importlib").util.find_spec("triton") else "torch_ref"
    assert chosen.name == expected
    # A head size the kernels do not take falls back to the reference backend.
    chosen = select_attention_backend(platform, config, 512, "bfloat16", None, kvik_plugin_manager)
    assert chosen.name == "torch_ref"


def test_capture_sizes() -> None:
    assert capture_sizes(256, 8192)[:6] == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(256, 8192)[-1] == 256 and len(capture_sizes(256, 8192)) == 35
    assert capture_sizes(20, 8192) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256, 4) == [1, 2, 4]


@pytest.mark.parametrize("value", [-1, True, 1.5, "512"])
def test_piecewise_max_tokens_must_be_a_whole_number(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir, kvik_plugin_manager, value: object
) -> None:
    fake_gpu(monkeypatch, "cuda", True)
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="piecewise_max_tokens must be an int >= 0"):
        _resolve(CUDAPlatform(), path, kvik_plugin_manager, platform_options={"piecewise_max_tokens": value})
    config = _resolve(CUDAPlatform(), path, kvik_plugin_manager, platform_options={"piecewise_max_tokens": 0}).config
    assert config.platform_options.piecewise_max_tokens == 0
