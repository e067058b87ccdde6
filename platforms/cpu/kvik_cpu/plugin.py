"""kvik-cpu's plugin module: registers the "cpu" platform.

The platform class lives in :mod:`kvik_cpu.platform` and is imported only when
kvik probes or uses it. Its options (``cpu_affinity``, ``num_threads``) are
typed platform options, so setting one on another platform is refused by the
core's config resolution; no ``kvik_configure`` hook is needed.
"""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_platforms(register: RegisterFn) -> None:
    register("cpu", "kvik_cpu.platform:CPUPlatform")
