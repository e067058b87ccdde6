"""kvik-cpu's plugin module: registers the "cpu" platform.

The platform class lives in :mod:`kvik_cpu.platform` and is imported only when
kvik probes or uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvik.plugins.hookspecs import RegisterFn, hookimpl

if TYPE_CHECKING:
    from kvik.config import EngineConfig

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register: RegisterFn) -> None:
    register("cpu", "kvik_cpu.platform:CPUPlatform")


@hookimpl
def kvik_configure(config: EngineConfig) -> list[str] | None:
    """Refuse CPU-only options on other platforms, so a typo is not silently ignored."""
    if config.extra.get("cpu_affinity") is not None and config.device not in (None, "auto", "cpu"):
        raise ValueError(
            f"extra['cpu_affinity'] applies to the cpu platform only, but device={config.device!r}; "
            "remove it or use device='cpu'"
        )
    return None
