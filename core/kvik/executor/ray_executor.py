"""The Ray executor: each rank a Ray actor running the same :class:`~kvik.executor.worker.Worker`.

Ray places the ranks (one placement-group bundle per rank: a GPU, or a CPU on CPU
platforms, packed onto as few nodes as possible so a tensor-parallel group shares a
host), so the engine needs no ``--nnodes`` / ``--node-rank``: it joins the cluster
``ray.init()`` finds (``RAY_ADDRESS``, or a local one it starts) and the actors meet
at a TCP store the engine hosts on its node's address. Steps go to every actor as
one object in Ray's store; a dead actor surfaces as Ray's ``RayActorError``, which
becomes an :class:`ExecutorError` naming the rank.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from kvik.executor.base import Executor, ExecutorError, RankMemory, ResolvedStructuredStep
from kvik.executor.profiling import ProfileSummary
from kvik.executor.step_codec import StepEncoder
from kvik.executor.worker import Worker, for_workers
from kvik.scheduling.output import RunnerOutput, SchedulerOutput
from kvik.worker.interface import StepHandle

logger = logging.getLogger(__name__)

POLL_S = 0.5


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(
            "distributed_executor_backend='ray' needs Ray: pip install 'kvik-core[ray]' (or pip install ray)"
        ) from None
    return ray


class RayExecutor(Executor):
    """``distributed_executor_backend="ray"``: the ranks as Ray actors, anywhere in the Ray cluster."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._actors: list[Any] = []
        self._group: Any = None
        self._store: Any = None
        self._failure: str | None = None
        self._encoder = StepEncoder()

    def start(self) -> None:
        import torch.distributed as dist

        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS names a cluster; otherwise a local one starts
        gpu = self.platform.device_type == "cuda"
        bundle = {"GPU": 1.0} if gpu else {"CPU": 1.0}
        self._group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ray.get(self._group.ready())
        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        config, model_config = for_workers(self.config, self.model_config)
        actor_cls = ray.remote(Worker)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self._group, placement_group_bundle_index=rank)
            options = {"num_gpus": 1} if gpu else {"num_cpus": 1}
            # Ray gives each GPU actor its device as the only visible one: local rank 0.
            actor = actor_cls.options(scheduling_strategy=strategy, **options).remote(
                config, model_config, rank=rank, local_rank=0
            )
            self._actors.append(actor)
        try:
            self._call("init_distributed", host, self._store.port)
            caps = self._call("load_model")
        except BaseException:
            self.shutdown()
            raise
        self.capabilities = replace(caps[0], async_scheduling=False)
        logger.info("started %d Ray actors", self.world_size)

    def _call(self, method: str, *args: Any) -> list[Any]:
        self.check_health()
        return self._gather([getattr(a, method).remote(*args) for a in self._actors])

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Every actor's result in rank order; the first failure (an exception or a dead actor) raises."""
        ray = _ray()
        results: list[Any] = [None] * len(refs)
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except Exception as exc:  # RayActorError (died) or RayTaskError (raised)
                    raise self._fail(f"worker rank {rank} failed: {type(exc).__name__}: {exc}") from None
        return results

    def _fail(self, reason: str) -> ExecutorError:
        if self._failure is None:
            self._failure = reason
            logger.error("Ray executor failed: %s; stopping the other actors", reason.splitlines()[0])
            self._kill_all()
        return ExecutorError(self._failure)

    def memory(self) -> list[RankMemory]:
        return list(self._call("memory"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def start_profile(self) -> None:
        self._call("start_profile")

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        return list(self._call("stop_profile", trace_dir))

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        ray = _ray()
        self.check_health()
        encoded = self._encoder.encode(ResolvedStructuredStep.resolve(scheduler_output))  # token lists as deltas: each rank keeps its copy
        shared = ray.put(encoded)  # serialized once for every actor
        refs = [a.execute.remote(shared) for a in self._actors]

        def finish() -> RunnerOutput:
            output = self._gather(refs)[self.output_rank]
            assert isinstance(output, RunnerOutput)
            return output

        return StepHandle(finish)

    def check_health(self) -> None:
        if self._failure is not None:
            raise ExecutorError(self._failure)

    def shutdown(self) -> None:
        if self._failure is None and self._actors:
            ray = _ray()
            try:
                ray.get([a.shutdown.remote() for a in self._actors], timeout=10)
            except Exception:
                logger.debug("Ray actors did not shut down cleanly", exc_info=True)
        self._kill_all()

    def _kill_all(self) -> None:
        if not self._actors and self._group is None:
            return
        ray = _ray()
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:
                logger.debug("ray.kill failed", exc_info=True)
        self._actors = []
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._group)
            except Exception:
                logger.debug("removing the placement group failed", exc_info=True)
            self._group = None
