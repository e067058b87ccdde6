"""kvik-cpu: registration, conformance, dtype choice, threads, affinity, memory and the IPEX notice."""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import kvik_cpu.plugin
import pytest
import torch
from kvik.config import EngineConfig, WeightsMode
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.platforms.selector import resolve_platform
from kvik.plugins.manager import PluginManager
from kvik.testing.conformance.platform import check_platform
from kvik_cpu import cpuinfo
from kvik_cpu import platform as cpu_platform
from kvik_cpu.platform import CPUPlatform

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Fake Xeon
flags\t\t: fpu sse2 avx2 avx512f {extra}
"""
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve {extra}\n"


@pytest.fixture(autouse=True)
def _restore_threads_and_affinity():
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    torch.set_num_threads(threads)
    if affinity is not None:
        os.sched_setaffinity(0, affinity)


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """fake_cpu(text): the platform reads ``text`` as /proc/cpuinfo."""

    def install(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(cpuinfo, "read_cpu_flags", lambda: REAL_READ_CPU_FLAGS(path))

    return install


REAL_READ_CPU_FLAGS = cpuinfo.read_cpu_flags  # the real parser, kept before any monkeypatching


@pytest.fixture
def no_ipex(monkeypatch):
    probe = cpuinfo.IpexProbe(None, None, "intel-extension-for-pytorch is not installed")
    monkeypatch.setattr(cpuinfo, "probe_ipex", lambda: probe)
    monkeypatch.setattr(cpu_platform, "_ipex_notice_logged", False)


# -- registration and conformance ------------------------------------------------


def test_conformance() -> None:
    assert check_platform(CPUPlatform) is True


def test_plugin_registers_the_cpu_platform() -> None:
    manager = PluginManager(load_entrypoints=False)
    assert manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    entry = manager.platforms.entry("cpu")
    assert (entry.distribution, entry.target) == ("kvik-cpu", "kvik_cpu.platform:CPUPlatform")
    assert isinstance(resolve_platform("cpu", manager), CPUPlatform)
    assert isinstance(resolve_platform(None, manager), CPUPlatform)


def test_cpu_has_the_lowest_priority(monkeypatch) -> None:
    class Accelerator(CPUPlatform):
        name = "accel"
        priority = 1

    module = types.ModuleType("fake_accel")
    module.Accelerator = Accelerator
    monkeypatch.setitem(__import__("sys").modules, "fake_accel", module)
    accel = types.ModuleType("accel_plugin")
    accel.KVIK_PLUGIN_API = ">=2.0,<3"
    from kvik.plugins.hookspecs import hookimpl

    accel.kvik_register_platforms = hookimpl(lambda register: register("accel", "fake_accel:Accelerator"))
    manager = PluginManager(load_entrypoints=False)
    manager.register(kvik_cpu.plugin, "cpu", "kvik-cpu")
    manager.register(accel, "accel", "kvik-accel")
    assert type(resolve_platform(None, manager)) is Accelerator
    assert type(resolve_platform("cpu", manager)) is CPUPlatform


# -- dtype -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fast"),
    [
        (X86_CPUINFO.format(extra="avx512_bf16"), True),
        (X86_CPUINFO.format(extra="amx_bf16 amx_tile"), True),
        (X86_CPUINFO.format(extra=""), False),
        (ARM_CPUINFO.format(extra="bf16 i8mm"), True),
        (ARM_CPUINFO.format(extra=""), False),
    ],
)
def test_default_dtype_follows_native_bf16(fake_cpu, no_ipex, text: str, fast: bool) -> None:
    fake_cpu(text)
    platform = CPUPlatform()
    half = "bfloat16" if fast else "float32"
    assert platform.default_dtype("bfloat16") == half
    assert platform.default_dtype("float16") == half  # fp16 matmuls are emulated on these CPUs
    assert platform.default_dtype("float32") == "float32"  # never lower a float32 checkpoint
    # GGUF: bf16 with the weights packed on every CPU (the packed kernel is scalar in float32).
    assert platform.default_dtype("bfloat16", "gguf") == "bfloat16"
    assert platform.default_dtype("bfloat16", "int8_example") == half
    packed, dense = WeightsMode.QUANTIZED, WeightsMode.DEQUANTIZE
    auto = EngineConfig(model="m")
    assert platform.quantized_weights_mode(auto, "gguf") == packed
    assert platform.quantized_weights_mode(EngineConfig(model="m", dtype="bfloat16"), "gguf") == packed
    assert platform.quantized_weights_mode(EngineConfig(model="m", dtype="float32"), "gguf") == dense
    assert platform.quantized_weights_mode(auto, "int8_example") == dense  # other methods: dequantized


def test_cpu_flags_parser(tmp_path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(X86_CPUINFO.format(extra="avx512_bf16") * 2)
    assert {"avx2", "avx512f", "avx512_bf16"} <= cpuinfo.read_cpu_flags(path)
    path.write_text(ARM_CPUINFO.format(extra="bf16"))
    assert cpuinfo.read_cpu_flags(path) == {"fp", "asimd", "sve", "bf16"}
    assert cpuinfo.read_cpu_flags(tmp_path / "missing") == frozenset()  # macOS, containers without /proc


# -- threads, affinity, defaults ------------------------------------------------


@pytest.fixture
def resolve(tiny_model_dir, kvik_plugin_manager):
    """resolve(platform=None, **engine_options) -> the ConfigResolution of a tiny Llama on the cpu platform."""
    path = tiny_model_dir("llama")

    def run(platform: Platform | None = None, **options):  # type: ignore[no-untyped-def]
        return resolve_config(EngineConfig(model=str(path), **options), platform or CPUPlatform(), kvik_plugin_manager)

    return run


def test_thread_count_is_applied(no_ipex, resolve) -> None:
    resolution = resolve(num_threads=1)
    assert torch.get_num_threads() == 1 and resolution.config.platform_options.num_threads == 1
    assert resolution.sources["platform_options.num_threads"] == "user"


def test_default_threads_are_physical_cores(no_ipex, monkeypatch, resolve) -> None:
    seen = []
    monkeypatch.setattr(cpuinfo, "physical_cores", lambda cpus=None: seen.append(cpus) or 1)
    resolution = resolve()
    assert resolution.config.platform_options.num_threads == 1 and torch.get_num_threads() == 1
    assert seen == [cpuinfo.usable_cpus()]
    assert resolution.sources["platform_options.num_threads"] == "platform cpu"


def _fake_topology(root: Path, cores: list[tuple[int, int]]) -> None:
    for cpu, (package, core) in enumerate(cores):
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_counts_smt_siblings_once(tmp_path) -> None:
    # cpus 0-3 are cores 0-3 of package 0, cpus 4-7 their hyper-thread siblings.
    _fake_topology(tmp_path, [(0, c) for c in range(4)] * 2)
    assert cpuinfo.physical_cores(list(range(8)), sysfs=tmp_path) == 4
    assert cpuinfo.physical_cores([0, 4], sysfs=tmp_path) == 1
    assert cpuinfo.physical_cores([0, 1], sysfs=tmp_path) == 2


def test_defaults_for_cpu(no_ipex, resolve) -> None:
    resolution = resolve()
    config = resolution.config
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (16, 32, 1024)
    assert 0 < config.kv_cache_memory <= 4 << 30 and config.num_kv_blocks == 0
    assert resolution.sources["kv_cache_memory"] == resolution.sources["max_num_seqs"] == "platform cpu"
    assert "kv_cache_memory" in resolution.report() and "(platform cpu)" in resolution.report()
    explicit = resolve(num_kv_blocks=10).config
    assert explicit.kv_cache_memory == 0 and explicit.num_kv_blocks == 10  # an explicit pool size is left alone


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux-only API")
def test_affinity(no_ipex, resolve) -> None:
    resolution = resolve(platform_options={"cpu_affinity": "0"})
    assert os.sched_getaffinity(0) == {0}
    assert "pinned to CPUs 0" in resolution.notes
    assert resolution.config.platform_options == cpu_platform.CPUOptions(num_threads=1, cpu_affinity=(0,))
    with pytest.raises(ValueError, match=r"cpu_affinity='4096' names CPUs \[4096\] that do not exist"):
        resolve(platform_options={"cpu_affinity": "4096"})
    with pytest.raises(ValueError, match="must look like '0-3,6'"):
        resolve(platform_options={"cpu_affinity": "first two"})


def test_parse_cpu_list() -> None:
    assert cpuinfo.parse_cpu_list("0-2, 5,2") == [0, 1, 2, 5]
    assert cpuinfo.parse_cpu_list([3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="at least one CPU"):
        cpuinfo.parse_cpu_list("")


def test_cpu_options_on_another_platform(resolve) -> None:
    from kvik.testing.host_platform import HostCPUPlatform

    with pytest.raises(ValueError, match="platform 'host-cpu' has no option 'cpu_affinity'; its options are: none"):
        resolve(HostCPUPlatform(), platform_options={"cpu_affinity": "0"})
    notes = resolve(HostCPUPlatform(), num_threads=2).notes
    assert "num_threads=2 is ignored: platform 'host-cpu' does not use it" in notes


# -- memory --------------------------------------------------------------------------


def test_memory_info_is_system_ram(no_ipex) -> None:
    import psutil

    memory = CPUPlatform().memory_info()
    assert isinstance(memory, MemoryInfo)
    assert memory.total <= psutil.virtual_memory().total and 0 < memory.free <= memory.total


def test_cgroup_limit_caps_memory(no_ipex, monkeypatch, tmp_path) -> None:
    (tmp_path / "memory.max").write_text("2147483648\n")
    (tmp_path / "memory.current").write_text("536870912\n")
    real = cpu_platform._cgroup_limit
    assert real(tmp_path) == (2 << 30, 1 << 29)
    monkeypatch.setattr(cpu_platform, "_cgroup_limit", lambda: real(tmp_path))
    assert CPUPlatform().memory_info() == MemoryInfo(total=2 << 30, free=(2 << 30) - (1 << 29))
    (tmp_path / "memory.max").write_text("max\n")
    assert real(tmp_path) is None


# -- IPEX ------------------------------------------------------------------------------


def test_without_ipex_one_info_notice_and_pure_torch(no_ipex, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kvik_cpu.platform"):
        first, second = CPUPlatform(), CPUPlatform()
    notices = [r for r in caplog.records if "intel-extension-for-pytorch" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.INFO
    assert "not installed; running pure PyTorch (attention: torch_ref)" in notices[0].getMessage()
    assert first.attention_backends == second.attention_backends == ("torch_ref",)


def test_with_ipex_it_is_preferred(monkeypatch, caplog) -> None:
    fake = cpuinfo.IpexProbe(types.ModuleType("intel_extension_for_pytorch"), "2.13.0", "using fake IPEX 2.13.0")
    monkeypatch.setattr(cpuinfo, "probe_ipex", lambda: fake)
    monkeypatch.setattr(cpu_platform, "_ipex_notice_logged", False)
    with caplog.at_level(logging.INFO, logger="kvik_cpu.platform"):
        platform = CPUPlatform()
    assert "using fake IPEX 2.13.0" in caplog.text
    assert platform.attention_backends == ("ipex_paged", "torch_ref")  # torch_ref still backs it up
    assert CPUPlatform.attention_backends == ("torch_ref",)  # the class is untouched


def test_real_probe_refuses_a_mismatched_ipex_before_importing(monkeypatch) -> None:
    monkeypatch.setattr(cpuinfo.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(cpuinfo.md, "version", lambda name: "2.8.0+cpu")
    probe = cpuinfo.probe_ipex()
    assert probe.module is None and probe.version == "2.8.0+cpu"
    assert f"needs torch 2.8, but torch is {torch.__version__}" in probe.reason


def test_real_probe_survives_an_ipex_that_exits(monkeypatch, tmp_path) -> None:
    (tmp_path / "intel_extension_for_pytorch.py").write_text("raise SystemExit(127)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cpuinfo.md, "version", lambda name: torch.__version__)
    probe = cpuinfo.probe_ipex()
    assert probe.module is None and "failed: SystemExit(127)" in probe.reason


def test_real_probe_here() -> None:
    probe = cpuinfo.probe_ipex()  # this machine has no matching IPEX
    assert probe.module is None and probe.reason


def test_platform_is_a_platform() -> None:
    assert issubclass(CPUPlatform, Platform) and CPUPlatform.priority == 0


@pytest.mark.parametrize("extra", ["", "avx512_bf16"])
def test_a_gguf_runs_packed_in_bf16_with_or_without_native_bf16(
    fake_cpu, no_ipex, tiny_model_dir, tmp_path, kvik_plugin_manager, extra: str
) -> None:
    """An AVX2-only CPU too: float32 dequantized weights made one stream ~1.8x slower and held ~1.9x the memory
    (docs/benchmarks.md); a dense bf16 checkpoint still runs in float32 there."""
    import kvik_gguf.plugin
    from kvik_gguf.convert import write_gguf

    kvik_plugin_manager.register(kvik_gguf.plugin, "gguf", "kvik-gguf")
    fake_cpu(X86_CPUINFO.format(extra=extra))
    gguf = write_gguf(tiny_model_dir("llama"), tmp_path / "m.gguf", "Q8_0")
    packed = resolve_config(EngineConfig(model=str(gguf)), CPUPlatform(), kvik_plugin_manager)
    assert packed.model_config.dtype == "bfloat16" and packed.config.quantized_weights is WeightsMode.QUANTIZED
    bf16_dir = tiny_model_dir("llama", dtype="bfloat16")
    dense = resolve_config(EngineConfig(model=str(bf16_dir)), CPUPlatform(), kvik_plugin_manager)
    assert dense.model_config.dtype == ("bfloat16" if extra else "float32")
