"""The in-process executor: one rank, the runner in the engine's own process (kvik's single-device path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvik.executor.base import Executor, RankMemory, RunnerCapabilities
from kvik.executor.worker import Worker

if TYPE_CHECKING:
    from kvik.executor.profiling import ProfileSummary
    from kvik.scheduling.output import SchedulerOutput
    from kvik.worker.interface import ModelRunner, StepHandle


class UniExecutor(Executor):
    """Runs the single rank's :class:`Worker` in this process; steps go straight to its runner
    (so async scheduling overlaps with the device exactly as the runner allows)."""

    _worker: Worker | None = None

    def start(self) -> None:
        self._worker = Worker(self.config, self.model_config, platform=self.platform, manager=self.manager)
        self.capabilities = self._worker.load_model()

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("start() must run first")
        return self._worker

    @property
    def local_runner(self) -> ModelRunner | None:
        return None if self._worker is None else self._worker.runner

    def memory(self) -> list[RankMemory]:
        return [self.worker.memory()]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.worker.runner.execute_async(scheduler_output)

    def start_profile(self) -> None:
        self.worker.start_profile()

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        return [self.worker.stop_profile(trace_dir)]

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()


__all__ = ["RunnerCapabilities", "UniExecutor"]
