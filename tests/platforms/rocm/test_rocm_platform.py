"""The "rocm" platform: it shares kvik-cuda's code and differs only in which torch build it accepts.

There is no AMD GPU here: the probes are faked.
"""

from __future__ import annotations

import types

import kvik_cuda.platform as gpu_platform
import pytest
import torch
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.selector import resolve_platform
from kvik.plugins.registry import PluginError
from kvik.testing.conformance.platform import check_platform
from kvik_cuda import plugin as cuda_plugin
from kvik_cuda.platform import CUDAPlatform, TorchGPUPlatform
from kvik_rocm import plugin as rocm_plugin
from kvik_rocm.platform import ROCmPlatform


def fake_gpu(monkeypatch: pytest.MonkeyPatch, build: str | None, visible: bool) -> None:
    monkeypatch.setattr(gpu_platform, "torch_gpu_build", lambda: build)
    monkeypatch.setattr(gpu_platform, "torch_gpu_visible", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 << 30, 192 << 30))
    props = types.SimpleNamespace(name="Fake MI300X", major=9, minor=4, multi_processor_count=304)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def test_shares_the_cuda_platform_code() -> None:
    assert issubclass(ROCmPlatform, TorchGPUPlatform) and not issubclass(ROCmPlatform, CUDAPlatform)
    assert ROCmPlatform.create_model_runner is CUDAPlatform.create_model_runner
    assert ROCmPlatform.configure is CUDAPlatform.configure
    assert ROCmPlatform.device_type == "cuda"  # ROCm torch drives AMD GPUs through torch.cuda


@pytest.mark.parametrize(
    "build,visible,rocm,cuda",
    [
        ("hip", True, True, False),
        ("hip", False, False, False),
        ("cuda", True, False, True),
        (None, False, False, False),
    ],
)
def test_each_platform_accepts_only_its_own_torch_build(
    monkeypatch: pytest.MonkeyPatch, build: str | None, visible: bool, rocm: bool, cuda: bool
) -> None:
    fake_gpu(monkeypatch, build, visible)
    assert ROCmPlatform.is_available() is rocm
    assert CUDAPlatform.is_available() is cuda
    if build == "cuda":
        assert "device='cuda'" in ROCmPlatform.unavailable_reason()


def test_this_machine_reports_unavailable() -> None:
    if torch.version.hip is not None and torch.cuda.is_available():
        pytest.skip("this machine has an AMD GPU")
    assert ROCmPlatform.is_available() is False
    assert check_platform(ROCmPlatform) is False


def test_conformance_with_a_faked_amd_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "hip", True)
    assert check_platform(ROCmPlatform) is True
    info = ROCmPlatform().describe()
    assert info["platform"] == "rocm" and "rocm" in info and info["device"] == "Fake MI300X (#0)"


def test_selection_on_a_rocm_build(kvik_plugin_manager, monkeypatch: pytest.MonkeyPatch) -> None:
    kvik_plugin_manager.register(cuda_plugin, "cuda", "kvik-cuda")
    kvik_plugin_manager.register(rocm_plugin, "rocm", "kvik-rocm")
    fake_gpu(monkeypatch, "hip", True)
    assert isinstance(resolve_platform("auto", kvik_plugin_manager), ROCmPlatform)
    assert isinstance(resolve_platform("amd", kvik_plugin_manager), ROCmPlatform)
    with pytest.raises(PluginError, match="device='rocm'"):
        resolve_platform("cuda", kvik_plugin_manager)


def test_resolution_uses_the_gpu_defaults(monkeypatch: pytest.MonkeyPatch, tiny_model_dir, kvik_plugin_manager) -> None:
    fake_gpu(monkeypatch, "hip", True)
    config = resolve_config(EngineConfig(model=str(tiny_model_dir("llama"))), ROCmPlatform(), kvik_plugin_manager).config
    assert (config.block_size, config.max_num_batched_tokens, config.max_num_seqs) == (16, 8192, 256)


@pytest.mark.parametrize(("build", "capability", "refused"), [("cuda", (8, 0), "compute capability >= 8.9"),
                                                              ("cuda", (9, 0), None), ("hip", (9, 4), "not verified")])  # fmt: skip
def test_fp8_kv_cache_on_the_triton_backend_needs_an_fp8_gpu(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir, kvik_plugin_manager, build: str, capability: tuple[int, int],
    refused: str | None,
) -> None:  # fmt: skip
    from kvik_triton_attention import plugin as triton_plugin

    kvik_plugin_manager.register(triton_plugin, "triton", "kvik-triton-attention")
    fake_gpu(monkeypatch, build, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    platform = CUDAPlatform() if build == "cuda" else ROCmPlatform()
    user = EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_dtype="fp8")
    if refused is None:
        config = resolve_config(user, platform, kvik_plugin_manager).config
        assert (config.attention_backend, config.kv_cache_dtype) == ("triton", "fp8_e4m3")
        return
    with pytest.raises(ValueError, match=rf"kv_cache_dtype='fp8' with the triton attention backend .*{refused}"
                                         r".*attention_backend='torch_ref'"):  # fmt: skip
        resolve_config(user, platform, kvik_plugin_manager)
    torch_ref = EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_dtype="fp8", attention_backend="torch_ref")
    assert resolve_config(torch_ref, platform, kvik_plugin_manager).config.attention_backend == "torch_ref"
