"""Profiling a rank's steps with torch.profiler (``LLM.start_profile()`` / ``LLM.stop_profile()``).

Each rank profiles itself: host activity and, where the platform has one, the device's
kernels (CUPTI also sees the kernels inside CUDA graph replays). On stop a rank writes a
Chrome trace (``rank{R}.json`` under the directory given, or ``$KVIK_TORCH_PROFILER_DIR``;
open it in Perfetto or chrome://tracing) when a directory is named, and returns a
:class:`ProfileSummary` in any case: the device time by kernel, which is what "how much of
a step is the all-reduce" asks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACE_DIR_ENV = "KVIK_TORCH_PROFILER_DIR"  # vLLM's VLLM_TORCH_PROFILER_DIR, under kvik's name
TOP_KERNELS = 25  # rows a summary keeps; the rest is summed into ``other_device_us``


@dataclass(frozen=True, slots=True)
class KernelTime:
    name: str
    device_us: float  # summed over every call in the window
    calls: int


@dataclass(slots=True)
class ProfileSummary:
    """One rank's profile window: device time by kernel, the largest first."""

    rank: int
    wall_s: float  # from start to stop
    device_us: float  # every kernel's time, summed (overlapping streams count twice; on the CPU: op self time)
    kernels: list[KernelTime] = field(default_factory=list)
    other_device_us: float = 0.0  # kernels past the TOP_KERNELS largest
    trace_path: str | None = None

    def share(self, *fragments: str) -> float:
        """The fraction of device time in kernels whose name holds any of ``fragments`` (case-insensitive),
        counting only the listed kernels (so it is a lower bound when ``other_device_us`` is large)."""
        wanted = [f.lower() for f in fragments]
        hit = sum(k.device_us for k in self.kernels if any(f in k.name.lower() for f in wanted))
        return hit / self.device_us if self.device_us else 0.0


def trace_dir(given: str | None) -> Path | None:
    """Where traces go: the argument, else ``$KVIK_TORCH_PROFILER_DIR``, else nowhere (summaries only)."""
    chosen = given or os.environ.get(TRACE_DIR_ENV)
    return Path(chosen) if chosen else None


class RankProfiler:
    """A torch.profiler window on one rank (one at a time)."""

    def __init__(self, rank: int, device_type: str) -> None:
        self.rank = rank
        self.device_type = device_type
        self._profiler: Any = None
        self._started = 0.0

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def start(self) -> None:
        import time

        import torch.profiler as tp

        if self._profiler is not None:
            raise RuntimeError("a profile is already running: stop_profile() first")
        activities = [tp.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        self._profiler = tp.profile(activities=activities, record_shapes=False, with_stack=False)
        self._profiler.__enter__()
        self._started = time.perf_counter()

    def stop(self, directory: Path | None) -> ProfileSummary:
        import time

        if self._profiler is None:
            raise RuntimeError("no profile is running: start_profile() first")
        profiler, self._profiler = self._profiler, None
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        profiler.__exit__(None, None, None)
        path = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            path = str(directory / f"rank{self.rank}.json")
            profiler.export_chrome_trace(path)
        return summarize(profiler, self.rank, wall, path, self.device_type)


def summarize(profiler: Any, rank: int, wall_s: float, trace_path: str | None, device_type: str) -> ProfileSummary:
    """Time by kernel from a finished profiler. On an accelerator: the device-side events (the kernels,
    not the host ops that launched them). On the CPU, where the ops are the kernels: each op's self time
    (its children's excluded, so nothing counts twice)."""
    from torch.autograd import DeviceType

    on_cpu = device_type == "cpu"
    times: dict[str, list[float]] = {}
    for event in profiler.events():
        if getattr(event, "is_user_annotation", False):  # a named range (nccl:all_reduce), not time of its own
            continue
        if on_cpu:
            if event.device_type != DeviceType.CPU:
                continue
            spent = float(event.self_cpu_time_total)
        else:
            if event.device_type == DeviceType.CPU:
                continue
            spent = float(event.device_time_total)
        entry = times.setdefault(event.name, [0.0, 0])
        entry[0] += spent
        entry[1] += 1
    ranked = sorted((KernelTime(name, us, int(n)) for name, (us, n) in times.items()), key=lambda k: -k.device_us)
    total = sum(k.device_us for k in ranked)
    kept = ranked[:TOP_KERNELS]
    return ProfileSummary(rank, round(wall_s, 4), total, kept, total - sum(k.device_us for k in kept), trace_path)
