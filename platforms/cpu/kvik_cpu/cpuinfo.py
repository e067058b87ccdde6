"""Cheap facts about the host CPU: instruction-set flags, usable cores, IPEX.

Every probe here is a plain function so tests can fake it (``monkeypatch``
the module attribute); none of them starts a thread pool or a device runtime.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform as py_platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil

CPUINFO = Path("/proc/cpuinfo")
SYSFS_CPU = Path("/sys/devices/system/cpu")
# x86: AVX512-BF16 dot products or AMX tiles; Arm: the ARMv8.6 BF16 extension ("bf16" in Features).
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(path: Path = CPUINFO) -> str:
    try:
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return py_platform.processor() or py_platform.machine()


def has_fast_bf16(flags: frozenset[str]) -> bool:
    """Whether bf16 matmuls run natively (not emulated through fp32) on this CPU."""
    return bool(flags & FAST_BF16_FLAGS)


def usable_cpus() -> list[int]:
    """CPU ids this process may run on (its affinity mask, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sysfs: Path = SYSFS_CPU) -> int:
    """Physical cores among ``cpus`` (default: this process's affinity mask).

    SMT siblings share one core's vector units, so a matmul thread per sibling
    only adds contention. Cores are counted from sysfs topology (distinct
    package/core ids); psutil alone would report the host's cores even inside a
    container limited by cpuset. Without sysfs, the SMT ratio is assumed even.
    """
    cpus = usable_cpus() if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            logical = psutil.cpu_count(logical=True) or 1
            physical = psutil.cpu_count(logical=False) or logical
            return max(1, len(cpus) * physical // logical)
    return max(1, len(cores))


def parse_cpu_list(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"0-3,6"`` or ``[0, 1, 2, 3, 6]`` -> sorted CPU ids; ValueError with the value on bad input."""
    if not isinstance(spec, str):
        ids = [int(x) for x in spec]
    else:
        ids = []
        try:
            for part in spec.replace(" ", "").split(","):
                if not part:
                    continue
                start, _, end = part.partition("-")
                ids.extend(range(int(start), int(end or start) + 1))
        except ValueError:
            raise ValueError(f"cpu_affinity must look like '0-3,6' or a list of CPU ids, got {spec!r}") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"cpu_affinity must name at least one CPU id >= 0, got {spec!r}")
    return sorted(set(ids))


@dataclass(slots=True)
class IpexProbe:
    """Result of looking for intel-extension-for-pytorch: the module, or why it is not used."""

    module: ModuleType | None
    version: str | None
    reason: str  # why it is (not) used, for the one INFO notice


def probe_ipex() -> IpexProbe:
    """Import IPEX only when it is installed *and* built for this torch's major.minor.

    A mismatched IPEX prints an error and calls ``exit()`` on import, so the
    version is compared from package metadata before importing.
    """
    import torch

    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return IpexProbe(None, None, "intel-extension-for-pytorch is not installed")
    try:
        version = md.version("intel_extension_for_pytorch")
    except md.PackageNotFoundError:
        version = "unknown"
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    ipex_mm = ".".join(version.split("+")[0].split(".")[:2])
    if ipex_mm != torch_mm:
        return IpexProbe(
            None,
            version,
            f"intel-extension-for-pytorch {version} needs torch {ipex_mm}, but torch is {torch.__version__}",
        )
    try:
        import intel_extension_for_pytorch as ipex
    except (Exception, SystemExit) as exc:  # IPEX exits the interpreter on some mismatches
        return IpexProbe(None, version, f"importing intel-extension-for-pytorch {version} failed: {exc!r}")
    return IpexProbe(ipex, version, f"using intel-extension-for-pytorch {version}")
