"""The multiprocess executor: one worker process per rank on this host.

The engine process starts ``tp x pp`` processes (``spawn``: no inherited CUDA or
thread state), hosts the torch.distributed TCP store they meet at, and talks to
each over a pipe: a call is one pickled ``(method, args)``, pickled once and
written to every pipe, and every rank answers (``None`` except the output rank's
samples), so the engine also learns of any rank's exception. While it waits it
watches the processes themselves: a rank that dies (killed, OOM, crashed) is
reported within one poll interval as an :class:`ExecutorError` naming it and its
exit code, the others are stopped, and the engine fails loudly instead of hanging
in a collective.

Steps overlap as they do in one process (async scheduling): a rank launches step N+1
before it waits for step N's samples, and answers N only then, so its host work for
N+1 (decoding the step, building inputs, launching) runs while the device still works
on N. Answers stay one per call and in call order; when the engine wants step N's
answer and has sent nothing after it, it sends ``flush``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import pickle
import time
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

from kvik.executor.base import Executor, ExecutorError, RankMemory, ResolvedStructuredStep
from kvik.executor.profiling import ProfileSummary
from kvik.executor.step_codec import StepEncoder
from kvik.executor.worker import Worker, for_workers
from kvik.scheduling.output import RunnerOutput, SchedulerOutput
from kvik.worker.interface import StepHandle

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting engine checks that every rank is alive
STOP_GRACE_S = 3.0  # a rank asked to stop gets this long before it is terminated


def _worker_main(conn: Connection, rank: int, config: Any, model_config: Any, store_port: int) -> None:
    """A worker process: join the group, then serve calls until told to stop or the engine is gone."""
    try:
        worker = Worker(config, model_config, rank=rank, local_rank=config.device_offset + rank)
        worker.init_distributed("127.0.0.1", store_port)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    pending: StepHandle | None = None  # the step launched last; its answer waits for the next message
    try:
        while True:
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the engine process is gone
                return
            if method == "execute":
                try:
                    launched: StepHandle | None = worker.execute_async(*args)
                    failure = None
                except BaseException as exc:
                    launched, failure = None, _error_answer(exc)
                if pending is not None:  # the next step is on the device: now wait for the previous one
                    _answer_step(conn, worker, pending)
                pending = launched
                if failure is not None:
                    conn.send(failure)
                continue
            if pending is not None:
                _answer_step(conn, worker, pending)
                pending = None
            if method == "flush":
                continue
            if method == "shutdown":
                return
            try:
                conn.send(("ok", getattr(worker, method)(*args)))
            except BaseException as exc:  # the engine re-raises it, naming this rank
                conn.send(_error_answer(exc))
    finally:
        worker.shutdown()


def _error_answer(exc: BaseException) -> tuple[str, str]:
    return ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def _answer_step(conn: Connection, worker: Worker, handle: StepHandle) -> None:
    """Send a launched step's answer: the output rank's samples, None from the others, or the error."""
    try:
        output = handle.result()
        conn.send(("ok", output if worker.is_output_rank else None))
    except BaseException as exc:  # the engine re-raises it, naming this rank
        conn.send(_error_answer(exc))


def _process_context() -> Any:
    """A fork server where the OS has one, else spawn. Both start workers without the engine's threads
    or device state; the fork server imports torch and kvik once, and every worker of every engine in
    this process forks from it, instead of each paying the imports again (seconds per rank)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["kvik.executor.preload"])
        return ctx
    return mp.get_context("spawn")


class MultiprocExecutor(Executor):
    """``distributed_executor_backend="mp"``: the ranks as processes of this host."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._store: Any = None
        self._failure: str | None = None
        self._encoder = StepEncoder()
        self._steps_sent = 0  # execute calls sent so far (a step's answer needs a flush if none followed it)
        self._steps_unanswered = 0

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        import torch.distributed as dist

        ctx = _process_context()
        # The engine hosts the rendezvous store, so it outlives any rank (port 0: a free one).
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        config, model_config = for_workers(self.config, self.model_config)
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(child, rank, config, model_config, self._store.port),
                name=f"kvik-worker-{rank}",
                daemon=True,  # never outlive the engine
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        try:
            self._gather()  # every rank joined the group
            caps = self._call("load_model")
        except BaseException:
            self.shutdown()
            raise
        # Overlapped steps (see the module docstring) where the runner can; pipeline stages keep their own
        # micro-batches in flight instead.
        overlap = caps[0].async_scheduling and self.config.pipeline_parallel_size == 1
        self.capabilities = replace(caps[0], async_scheduling=overlap)
        logger.info("started %d worker processes (pids %s)", self.world_size, [p.pid for p in self._procs])

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    # -- calls -----------------------------------------------------------------------------
    def _send(self, method: str, *args: Any) -> None:
        self.check_health()
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._conns:
                conn.send_bytes(payload)
        except OSError as exc:  # a pipe closed under us: a rank is gone
            self._gather()  # names the dead rank
            raise self._fail(f"could not reach a worker: {exc}") from exc

    def _gather(self) -> list[Any]:
        """Every rank's answer to the last call, in rank order; ExecutorError if one failed or died."""
        results: list[Any] = [None] * len(self._conns)
        pending = dict(enumerate(self._conns))
        while pending:
            ready = wait(list(pending.values()), timeout=POLL_S)
            for rank, conn in list(pending.items()):
                if conn not in ready:
                    continue
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    continue  # its process ended: reported below
                if kind == "error":
                    # A rank that failed on its own sent its error before it ended: that error is the cause.
                    first = self._first_error(pending, before=rank)
                    if first is not None:
                        raise self._fail(first)
                    # A collective fails on every rank when one rank dies: name the dead one, the cause,
                    # when there is one (its exit can lag its peers' errors by a moment).
                    dead = self._dead_rank(settle_s=1.0, other_than=rank)
                    if dead is not None:
                        raise self._fail(f"{dead} (then rank {rank} failed: {str(value).splitlines()[0][:200]})")
                    raise self._fail(f"worker rank {rank} failed: {value}")
                results[rank] = value
                del pending[rank]
            for rank, proc in enumerate(self._procs):
                if not proc.is_alive():
                    raise self._fail(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")
        return results

    def _first_error(self, pending: dict[int, Connection], before: int) -> str | None:
        """"worker rank R failed: ..." for the lowest-numbered rank below ``before`` whose answer waiting in its
        pipe is an error, else None."""
        for rank, conn in sorted(pending.items()):
            if rank >= before:
                break
            try:
                if conn.poll(0):
                    kind, value = conn.recv()
                    if kind == "error":
                        return f"worker rank {rank} failed: {value}"
            except (EOFError, OSError):
                continue
        return None

    def _dead_rank(self, settle_s: float, other_than: int) -> str | None:
        """"worker rank R (pid P) died with exit code C" for the first rank but ``other_than`` whose process has
        ended, waiting up to ``settle_s`` for one to end; None if they are all alive."""
        deadline = time.monotonic() + settle_s
        while True:
            for rank, proc in enumerate(self._procs):
                if rank != other_than and not proc.is_alive():
                    return f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _call(self, method: str, *args: Any) -> list[Any]:
        if self._steps_unanswered:  # a rank answers in call order: this answer would be a step's
            raise RuntimeError(f"{method}() called with {self._steps_unanswered} step(s) not yet answered")
        self._send(method, *args)
        return self._gather()

    def _fail(self, reason: str) -> ExecutorError:
        if self._failure is None:
            self._failure = reason
            logger.error("distributed executor failed: %s; stopping the other workers", reason.splitlines()[0])
            self._stop_all(grace=0.0)
        return ExecutorError(self._failure)

    # -- the contract ------------------------------------------------------------------------
    def memory(self) -> list[RankMemory]:
        return list(self._call("memory"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def start_profile(self) -> None:
        self._call("start_profile")

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        return list(self._call("stop_profile", trace_dir))

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        encoded = self._encoder.encode(ResolvedStructuredStep.resolve(scheduler_output))  # token lists as deltas: each rank keeps its copy
        self._send("execute", encoded)
        self._steps_sent += 1
        self._steps_unanswered += 1
        number = self._steps_sent

        def finish() -> RunnerOutput:
            if number == self._steps_sent:  # nothing launched after it: the ranks would wait for the next step
                self._send("flush")
            self._steps_unanswered -= 1
            output = self._gather()[self.output_rank]
            assert isinstance(output, RunnerOutput)
            return output

        return StepHandle(finish)

    def check_health(self) -> None:
        if self._failure is None:
            for rank, proc in enumerate(self._procs):
                if not proc.is_alive():
                    self._fail(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")
                    break
        if self._failure is not None:
            raise ExecutorError(self._failure)

    def shutdown(self) -> None:
        if self._failure is None:
            payload = pickle.dumps(("shutdown", ()))
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.send_bytes(payload)
        self._stop_all(grace=STOP_GRACE_S)

    def _stop_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for conn in self._conns:
            conn.close()
        self._conns = [] if self._failure is None else self._conns
        self._procs = [] if self._failure is None else self._procs
