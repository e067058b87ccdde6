"""Text reports behind ``kvik plugins`` and ``kvik env``."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform as py_platform
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvik.plugins.manager import REGISTRATION_HOOKS
from kvik.plugins.registry import Entry
from kvik.version import PLUGIN_API_VERSION, __version__

if TYPE_CHECKING:
    from kvik.plugins.manager import PluginManager

_TITLES = {
    "platform": "Platforms",
    "attention backend": "Attention backends",
    "quantization method": "Quantization methods",
    "model architecture": "Model architectures",
    "model format": "Model formats",
    "structured output backend": "Structured output backends",
}


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for row in (headers, *rows):
        lines.append(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return lines


def _dist_version(dist: str | None) -> str:
    if dist is None:
        return "-"
    try:
        return f"{dist} {md.version(dist)}"
    except md.PackageNotFoundError:
        return dist


def _summary(reason: str) -> str:
    """The last line of a traceback (the exception), or the whole one-line reason."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}" if not lines[0].startswith("Traceback") else lines[-1]


def platform_availability(entry: Entry) -> str:
    """'yes', 'no: <reason>' or 'broken: <error>' for one registered platform (never raises)."""
    try:
        cls = entry.load()
        if cls.is_available():
            return "yes"
        return f"no: {cls.unavailable_reason() or 'hardware or runtime not found'}"
    except Exception as exc:
        return f"broken: {type(exc).__name__}: {exc}"


def quantization_support(entry: Entry) -> tuple[str, str]:
    """(devices with packed kernels, activation dtypes) of one quantization method (never raises).

    Every method also runs dequantized to the compute dtype on any platform.
    """
    try:
        cls = entry.load()
    except Exception as exc:
        return f"broken: {type(exc).__name__}", "-"
    devices = ", ".join(getattr(cls, "devices", ())) or "any (torch ops, no device kernels)"
    note = getattr(cls, "device_requirements", "")
    dtypes = ", ".join(str(d).removeprefix("torch.") for d in getattr(cls, "supported_act_dtypes", ()))
    return (f"{devices} ({note})" if note else devices), dtypes or "-"


def plugins_report(manager: PluginManager) -> str:
    """Every loaded plugin and what it registered, platform availability, failures and conflicts."""
    out = [f"kvik {__version__}, plugin API {PLUGIN_API_VERSION}", "", "Plugins:"]
    plugins = manager.plugins()
    if plugins:
        out += _table(("NAME", "DISTRIBUTION"), [(name, _dist_version(dist)) for name, dist in plugins])
    else:
        out.append("  (none loaded)")
    for kind in REGISTRATION_HOOKS:
        registry = manager.registry(kind)
        out += ["", f"{_TITLES.get(kind, kind.capitalize() + 's')}:"]
        entries = registry.entries()
        if not entries:
            out.append("  (none registered)")
            continue
        rows: list[tuple[str, ...]]
        if kind == "platform":
            rows = [(e.name, e.source, e.target, _priority(e), platform_availability(e), _options(e)) for e in entries]
            out += _table(("NAME", "DISTRIBUTION", "TARGET", "PRIORITY", "AVAILABLE", "OPTIONS"), rows)
        elif kind == "quantization method":
            rows = [(e.name, e.source, *quantization_support(e)) for e in entries]
            out += _table(("NAME", "DISTRIBUTION", "PACKED KERNELS ON", "ACTIVATION DTYPES"), rows)
        else:
            rows = [(e.name, e.source, e.target) for e in entries]
            out += _table(("NAME", "DISTRIBUTION", "TARGET"), rows)
    failures = manager.failures
    if failures:
        out += ["", "Failed plugins (full tracebacks are logged at WARNING):"]
        out += _table(
            ("NAME", "DISTRIBUTION", "REASON"),
            [(f.plugin, f.distribution or "-", _summary(f.reason)) for f in failures],
        )
    if manager.skipped:
        out += ["", "Skipped plugins:"]
        out += _table(
            ("NAME", "DISTRIBUTION", "REASON"), [(s.plugin, s.distribution or "-", s.reason) for s in manager.skipped]
        )
    conflicts = manager.conflicts()
    if conflicts:
        out += ["", "Conflicts (these names cannot be used until one plugin is removed or blocked):"]
        conflict_rows = [
            (kind, name, ", ".join(f"{e.source} ({e.target})" for e in entries))
            for kind, by_name in conflicts.items()
            for name, entries in sorted(by_name.items())
        ]
        out += _table(("KIND", "NAME", "REGISTERED BY"), conflict_rows)
    return "\n".join(out)


def _priority(entry: Entry) -> str:
    try:
        return str(entry.load().priority)
    except Exception:
        return "?"


def _options(entry: Entry) -> str:
    """The platform's ``platform_options`` names (``--platform-option KEY=VALUE``)."""
    from dataclasses import fields

    try:
        return ", ".join(f.name for f in fields(entry.load().options_type)) or "-"
    except Exception:
        return "?"


def _selected(manager: PluginManager) -> str:
    from kvik.platforms.selector import ENV_DEVICE, resolve_platform

    forced = os.environ.get(ENV_DEVICE)
    try:
        name = resolve_platform(None, manager).name
    except Exception as exc:
        return f"none ({exc})"
    return f"{name} (forced by ${ENV_DEVICE}={forced})" if forced else f"{name} (highest priority available)"


def _cpu_lines() -> list[str]:
    model = py_platform.processor() or py_platform.machine()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"  cpu: {model} ({py_platform.machine()}), {os.cpu_count()} logical CPUs, {usable} usable"]
    try:
        import psutil

        vm = psutil.virtual_memory()
        lines.append(f"  memory: {vm.total / 2**30:.1f} GiB total, {vm.available / 2**30:.1f} GiB available")
    except ImportError:
        pass
    return lines


def env_report(manager: PluginManager | None = None) -> str:
    """Versions, hardware and installed kvik distributions, for bug reports."""
    import torch

    from kvik.plugins.manager import get_plugin_manager

    manager = manager or get_plugin_manager()
    out = [
        f"kvik: {__version__} (plugin API {PLUGIN_API_VERSION})",
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"os: {py_platform.platform()}",
        f"torch: {torch.__version__} (cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads)",
    ]
    out += ["", "CPU:", *_cpu_lines()]
    out += ["", "CUDA / ROCm (torch):"]
    if torch.cuda.is_available():
        runtime = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        out.append(f"  {runtime}, {torch.cuda.device_count()} device(s)")
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            out.append(f"  [{index}] {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        built = torch.version.cuda or torch.version.hip
        out.append(f"  not available (torch built {'with ' + built if built else 'for CPU only'})")
    out += ["", "Platforms:"]
    entries = manager.platforms.entries()
    if entries:
        out += _table(
            ("NAME", "DISTRIBUTION", "AVAILABLE"), [(e.name, e.source, platform_availability(e)) for e in entries]
        )
    else:
        out.append("  (none registered; pip install kvik-cpu)")
    if entries:
        out.append(f"  selected for device=None: {_selected(manager)}")
    for entry in entries:
        if platform_availability(entry) != "yes":
            continue
        try:
            facts = entry.load()().describe()
        except Exception as exc:
            facts = {"error": f"{type(exc).__name__}: {exc}"}
        out += ["", f"Platform {entry.name}:"]
        out += [f"  {key}: {value}" for key, value in facts.items() if key != "platform"]
    out += ["", "Installed kvik distributions:"]
    dists = sorted(
        {
            (d.metadata["Name"], d.version)
            for d in md.distributions()
            if (d.metadata["Name"] or "").lower().startswith("kvik")
        }
    )
    out += _table(("NAME", "VERSION"), dists) if dists else ["  (none)"]
    return "\n".join(out)
