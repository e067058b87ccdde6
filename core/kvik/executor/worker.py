"""One rank: its device, its place in the parallel layout, its model runner.

The same class runs in the engine's process (``uni``), in a worker process (``mp``)
and as a Ray actor (``ray``); only how its methods are called differs. A rank of a
parallel engine joins the torch.distributed group through the engine's TCP store
(:meth:`Worker.init_distributed`) before its runner is built, so the model is built
from the rank's :class:`~kvik.distributed.parallel_state.ParallelState`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from kvik.config import ModelConfig, ResolvedConfig
from kvik.executor.base import RankMemory, RunnerCapabilities
from kvik.executor.profiling import ProfileSummary, RankProfiler, trace_dir
from kvik.executor.step_codec import EncodedStep, StepDecoder

if TYPE_CHECKING:
    from kvik.platforms.interface import Platform
    from kvik.plugins.manager import PluginManager
    from kvik.scheduling.output import RunnerOutput, SchedulerOutput
    from kvik.worker.interface import ModelRunner, StepHandle

logger = logging.getLogger(__name__)

# A collective that waits this long has lost a peer; the executor notices a dead process much
# sooner (it watches the processes), this only bounds what a stuck survivor waits for.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def for_workers(config: ResolvedConfig, model_config: ModelConfig) -> tuple[ResolvedConfig, ModelConfig]:
    """The configuration a worker in another process gets: the model facts without the loaded
    format object (the worker opens the checkpoint itself), CUDA graphs off under pipeline
    parallelism (point-to-point transfers are not captured)."""
    if config.pipeline_parallel_size > 1 and not config.enforce_eager:
        config = replace(config, enforce_eager=True)
    return config, replace(model_config, source=None)


class Worker:
    """A rank's runner, built on the platform the config names."""

    def __init__(
        self,
        config: ResolvedConfig,
        model_config: ModelConfig,
        rank: int = 0,
        local_rank: int = 0,
        platform: Platform | None = None,
        manager: PluginManager | None = None,
    ) -> None:
        from kvik.platforms.selector import resolve_platform
        from kvik.plugins.manager import get_plugin_manager

        self.config = config
        self.model_config = model_config
        self.rank = rank
        self.manager = manager or get_plugin_manager()
        self.platform = platform or resolve_platform(config.platform, self.manager)
        self._runner: ModelRunner | None = None
        self._steps = StepDecoder()  # token lists of live requests, for steps sent as deltas
        self._profiler = RankProfiler(rank, self.platform.device_type)
        if platform is None:  # a process of its own: bind the device, apply process-wide settings
            self.platform.bind_rank(local_rank)
            self.platform.configure(config, model_config)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("load_model() must run first")
        return self._runner

    @property
    def is_output_rank(self) -> bool:
        cfg = self.config
        return self.rank == (cfg.pipeline_parallel_size - 1) * cfg.tensor_parallel_size

    def init_distributed(self, store_host: str, store_port: int) -> None:
        """Join the engine's torch.distributed group (rendezvous over its TCP store) and set this
        process's :class:`~kvik.distributed.parallel_state.ParallelState`."""
        import torch.distributed as dist

        from kvik.distributed.parallel_state import init_parallel_state

        cfg = self.config
        backend = self.platform.distributed_backend
        if backend is None:
            raise ValueError(f"platform {self.platform.name!r} has no torch.distributed backend")
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group(
            backend, store=store, rank=self.rank, world_size=cfg.world_size, timeout=COLLECTIVE_TIMEOUT
        )
        state = init_parallel_state(cfg.tensor_parallel_size, cfg.pipeline_parallel_size, self.rank)
        if state.tp_size > 1 and not cfg.disable_custom_all_reduce:
            state.fast_all_reduce = self.platform.tensor_parallel_all_reduce(state.tp_group, self.model_config.dtype)

    def load_model(self) -> RunnerCapabilities:
        self._runner = self.platform.create_model_runner(self.config, self.model_config)
        self._runner.load_model()
        return RunnerCapabilities.of(self._runner)

    def memory(self) -> RankMemory:
        runner = self.runner
        info = self.platform.memory_info()
        weights = runner.weight_bytes()
        activations = runner.profile()
        groups = runner.kv_cache_groups()
        return RankMemory(
            info.total,
            info.free,
            weights,
            activations,
            runner.kv_block_bytes(self.config.block_size),
            groups.windows if groups is not None else None,
        )

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, step: SchedulerOutput | EncodedStep) -> RunnerOutput | None:
        """Run one step (whole, or encoded by :class:`~kvik.executor.step_codec.StepEncoder`); the output
        rank returns its samples, the others None (nothing to send back)."""
        output = self.execute_async(step).result()
        return output if self.is_output_rank else None

    def execute_async(self, step: SchedulerOutput | EncodedStep) -> StepHandle:
        """Launch one step on the runner (returns before the device finishes where the runner can); the
        handle's result is the runner's output on every rank (only the output rank's is worth sending)."""
        scheduler_output = self._steps.decode(step) if isinstance(step, EncodedStep) else step
        return self.runner.execute_async(scheduler_output)

    def start_profile(self) -> None:
        """Start a torch.profiler window on this rank (:mod:`kvik.executor.profiling`)."""
        self._profiler.start()

    def stop_profile(self, directory: str | None = None) -> ProfileSummary:
        """End the window: the rank's time by kernel, and its Chrome trace where a directory is named."""
        return self._profiler.stop(trace_dir(directory))

    def shutdown(self) -> None:
        if self._profiler.active:  # a window left open: close it, keep nothing
            self._profiler.stop(None)
        if self._runner is not None:
            self._runner.shutdown()
            self._runner = None
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # shutting down: a peer may be gone already
            logger.debug("destroy_process_group failed", exc_info=True)
