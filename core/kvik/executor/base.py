"""The executor: who runs an engine's ranks, and how a step reaches them.

The engine keeps the scheduler, the KV-block bookkeeping and detokenization in its own
process; an executor owns the model runners. One rank is today's path (``uni``: the
runner lives in the engine's process). Several ranks (tensor x pipeline parallel) run
one :class:`kvik.executor.worker.Worker` each, in worker processes (``mp``) or Ray
actors (``ray``); every step's :class:`SchedulerOutput` goes to all of them and the
samples come back from one. Executors are plugins (``kvik_register_executors``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from kvik.config import ModelConfig, ResolvedConfig

if TYPE_CHECKING:
    from kvik.executor.profiling import ProfileSummary
    from kvik.platforms.interface import Platform
    from kvik.plugins.manager import PluginManager
    from kvik.scheduling.output import SchedulerOutput
    from kvik.worker.interface import ModelRunner, StepHandle


class ExecutorError(RuntimeError):
    """A rank failed or died: the engine cannot continue (the message names the rank and the cause)."""


@dataclass(frozen=True, slots=True)
class RunnerCapabilities:
    """What every rank's model runner supports (the engine checks these at admission)."""

    structured_output: bool
    async_scheduling: bool
    speculative_decoding: bool
    pooling: bool
    drafters: bool  # model-based speculation (draft model, EAGLE) on the runner
    lora: bool
    deterministic: bool = False  # batch-invariant kernels (deterministic=True)
    prefix_caching: bool = True  # requests may start from blocks other requests wrote

    @classmethod
    def of(cls, runner: ModelRunner) -> RunnerCapabilities:
        return cls(runner.supports_structured_output, runner.supports_async_scheduling,
                   runner.supports_speculative_decoding, runner.supports_pooling,
                   runner.supports_drafters, runner.supports_lora,
                   getattr(runner, "supports_deterministic", False),
                   getattr(runner, "supports_prefix_caching", True))  # fmt: skip


@dataclass(frozen=True, slots=True)
class RankMemory:
    """One rank's inputs to the memory planner, in bytes (each rank plans; the engine takes the smallest pool)."""

    total: int  # device memory the rank may plan against
    free: int
    weight_bytes: int  # this rank's slice of the weights
    activation_bytes: int  # peak of a maximal step (profiled)
    block_bytes: int  # one KV block of this rank's layers and heads
    # Per KV-cache group, its layers' window (kvik.scheduling.kv_cache_groups), as the rank's runner keeps
    # them; None: one table for every layer, whose window the engine derives from the model.
    group_windows: tuple[int | None, ...] | None = None


@dataclass(slots=True)
class ResolvedStructuredStep:
    """A structured-output step whose bitmask is computed: what crosses a process boundary
    in place of :class:`kvik.structured.manager.StructuredStep` (whose future cannot)."""

    request_ids: list[str]
    mask: np.ndarray  # [len(request_ids), ceil(vocab / 32)] int32

    def bitmask(self) -> np.ndarray:
        return self.mask

    @staticmethod
    def resolve(step: SchedulerOutput) -> SchedulerOutput:
        """``step`` with its structured-output future (if any) replaced by the finished bitmask: the step a
        worker process or actor can receive."""
        if step.structured is None:
            return step
        resolved = ResolvedStructuredStep(list(step.structured.request_ids), step.structured.bitmask())
        return replace(step, structured=resolved)  # type: ignore[arg-type]


class Executor(ABC):
    """Runs the model runner of every rank of one engine.

    Contract (the engine calls these in this order, from one thread):

    1. ``__init__(config, model_config, platform, manager)`` starts nothing.
    2. :meth:`start` starts the ranks, builds each one's runner and loads its slice of
       the weights; it raises (an :class:`ExecutorError` naming the rank, or the rank's
       own ``ValueError``) when any rank cannot.
    3. :attr:`capabilities` is valid from then on.
    4. :meth:`memory` profiles every rank; the engine plans the KV cache on each and
       calls :meth:`initialize_kv_cache` with the smallest block count, the same on all.
    5. :meth:`execute_async` many times: every rank runs every step, in launch order;
       ``result()`` of the handle is the :class:`RunnerOutput` of the output rank (the
       first rank of the last pipeline stage). When a rank fails or its process dies,
       ``result()`` raises :class:`ExecutorError` within seconds, never hangs, and
       every later call raises it too.
    6. :meth:`check_health` raises that error (cheap; the server's readiness uses it).
    7. :meth:`shutdown` ends every rank; idempotent, never raises.
    """

    def __init__(
        self, config: ResolvedConfig, model_config: ModelConfig, platform: Platform, manager: PluginManager
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.platform = platform
        self.manager = manager
        self.capabilities = RunnerCapabilities(False, False, False, False, False, False)

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def output_rank(self) -> int:
        """The rank whose samples the engine gets: tensor rank 0 of the last pipeline stage."""
        return (self.config.pipeline_parallel_size - 1) * self.config.tensor_parallel_size

    @property
    def local_runner(self) -> ModelRunner | None:
        """The runner in the engine's own process, if there is one (``uni``), for tests and tools."""
        return None

    @abstractmethod
    def start(self) -> None:
        """Start the ranks and load the model on each (sets :attr:`capabilities`)."""

    @abstractmethod
    def memory(self) -> list[RankMemory]:
        """Profile every rank: one :class:`RankMemory` per rank, in rank order."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` KV blocks on every rank."""

    @abstractmethod
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launch one step on every rank; the handle's ``result()`` is the output rank's samples."""

    def start_profile(self) -> None:
        """Start a torch.profiler window on every rank (between steps: none in flight)."""
        raise NotImplementedError(f"executor {type(self).__name__} cannot profile its ranks")

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        """End it: every rank's :class:`~kvik.executor.profiling.ProfileSummary`, in rank order (and each
        rank's Chrome trace in ``trace_dir``, else ``$KVIK_TORCH_PROFILER_DIR``, when either is set)."""
        raise NotImplementedError(f"executor {type(self).__name__} cannot profile its ranks")

    def check_health(self) -> None:  # noqa: B027 - in-process ranks cannot die apart from the engine
        """Raise :class:`ExecutorError` if a rank has failed or died."""

    @abstractmethod
    def shutdown(self) -> None:
        """End every rank and release its devices (idempotent, never raises)."""

    def describe(self) -> dict[str, Any]:
        """Facts for the start-up log."""
        return {"executor": type(self).__name__, "world_size": self.world_size}
