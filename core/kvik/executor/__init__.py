"""Executors: who runs an engine's ranks (in process, worker processes, Ray actors); see :mod:`kvik.executor.base`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvik.executor.base import Executor, ExecutorError, RankMemory, RunnerCapabilities

if TYPE_CHECKING:
    from kvik.config import ModelConfig, ResolvedConfig
    from kvik.platforms.interface import Platform
    from kvik.plugins.manager import PluginManager

__all__ = ["Executor", "ExecutorError", "RankMemory", "RunnerCapabilities", "create_executor"]


def create_executor(
    config: ResolvedConfig, model_config: ModelConfig, platform: Platform, manager: PluginManager
) -> Executor:
    """The executor ``config.distributed_executor_backend`` names, built (not started)."""
    from kvik.executor.uni import UniExecutor
    from kvik.plugins.registry import PluginError

    name = config.distributed_executor_backend
    try:
        cls = manager.executors.get(name)
    except PluginError:
        if name != "uni":
            raise
        cls = UniExecutor  # the core's own path works even under a plugin manager that lacks the built-ins
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise TypeError(f"executor {name!r} is {cls!r}, not a kvik.executor.Executor subclass")
    executor: Executor = cls(config, model_config, platform, manager)
    return executor
