"""AsyncLLM: an asyncio front end over LLMEngine, stepping on its own thread.

Request handling (tokenization, validation, streaming) happens on the event
loop; the step loop runs on a dedicated thread so neither blocks the other.
The two talk through a thread-safe command queue (in) and per-request asyncio
queues fed with ``call_soon_threadsafe`` (out).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kvik.config import EngineConfig, ResolvedConfig
from kvik.engine.llm_engine import EngineStats, LLMEngine, PreparedRequest
from kvik.lora.adapter import AdapterInfo
from kvik.lora.request import LoRARequest
from kvik.outputs import RequestOutput
from kvik.pooling.outputs import PoolingRequestOutput
from kvik.pooling.params import PoolingParams
from kvik.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# What a request's queue carries: generation outputs, a pooling result, or the error that ended it.
_Item = RequestOutput | PoolingRequestOutput | BaseException

_IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The step loop stopped because of an error; no request can be served."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name or engine.config.model_name
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._accepting = True
        self._error: BaseException | None = None
        self._stats: EngineStats = engine.get_stats()

    @classmethod
    def from_engine_args(cls, model_name: str | None = None, engine_process: bool = False, **kwargs: Any) -> AsyncLLM:
        """Build the engine from ``kwargs`` (:class:`EngineConfig`'s fields); with ``engine_process`` it runs in
        a child process, its step loop apart from this process's request handling (:mod:`kvik.engine.engine_process`)."""
        if engine_process:
            from kvik.engine.engine_process import ProcessAsyncLLM

            return ProcessAsyncLLM.from_engine_args(model_name=model_name, **kwargs)
        return cls(LLMEngine(EngineConfig.from_kwargs(**kwargs)), model_name=model_name)

    # -- properties used by servers -------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def config(self) -> ResolvedConfig:
        """The engine's resolved configuration."""
        return self.engine.config

    def get_stats(self) -> EngineStats:
        return self._stats

    @property
    def error(self) -> BaseException | None:
        """What stopped the step loop (e.g. a worker process that died), or None while it runs."""
        return self._error

    def is_healthy(self) -> bool:
        return self._error is None and (self._thread is None or self._thread.is_alive() or not self._running)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start the step loop; call from within the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._run_loop, name="kvik-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_period: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for ``grace_period`` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_period
        while self._streams and time.monotonic() < deadline and self._error is None:
            await asyncio.sleep(0.02)
        for request_id in list(self._streams):
            await self.abort(request_id)
        self._running = False
        await asyncio.to_thread(self._stop_loop)
        # Aborts queued after the loop's last pass never reached the engine: end those streams here.
        for request_id in list(self._streams):
            self._fail_one(request_id, EngineDeadError("the engine shut down before this request finished"))
        self.engine.shutdown()

    def _stop_loop(self) -> None:
        """End the loop thread once ``_running`` is False (it finishes its current step first)."""
        self._send("wake", None)
        if self._thread is not None:
            self._thread.join(10.0)

    # -- requests --------------------------------------------------------------
    def _ensure_running(self) -> None:
        """Refuse new work once the loop failed or is shutting down; start the loop on first use."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed: {self._error!r}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        if self._thread is None:
            self.start()

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request (cumulative, or only the new part with ``output_kind="delta"``); the
        last has ``finished=True``.

        Raises ValueError for invalid input before yielding anything. Leaving
        the iteration early (client gone, task cancelled) aborts the request.
        """
        self._ensure_running()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str) and len(prompt) > 4096:
            prepared = await asyncio.to_thread(
                self.engine.prepare_request, request_id, prompt, sampling_params, priority, None, lora_request
            )
        else:
            prepared = self.engine.prepare_request(
                request_id, prompt, sampling_params, priority, lora_request=lora_request
            )
        stream: asyncio.Queue[_Item] = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        delta = sampling_params is not None and sampling_params.output_kind == "delta"
        try:
            self._send("add", prepared)
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, RequestOutput)
                # Collapse a backlog: of cumulative outputs only the newest matters; deltas are merged.
                while not item.finished and not stream.empty():
                    newer = stream.get_nowait()
                    if isinstance(newer, BaseException):
                        raise newer
                    assert isinstance(newer, RequestOutput)
                    if delta:
                        item.add(newer)
                    else:
                        item = newer
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def encode_batch(
        self, prompts: Sequence[str | Sequence[int]], params: PoolingParams, request_ids: Sequence[str]
    ) -> list[PoolingRequestOutput]:
        """Pool every prompt (vLLM's ``encode``, for a whole request's inputs at once); results in input order.

        Every input is validated before any is queued (ValueError names the problem), so a
        bad input leaves nothing behind; leaving early (cancellation) aborts the unfinished ones.
        """
        self._ensure_running()
        if any(rid in self._streams for rid in request_ids):
            raise ValueError("request id already in use")

        def prepare() -> list[PreparedRequest]:
            return self.engine.prepare_pooling_requests(request_ids, prompts, [params] * len(prompts))

        long_text = sum(len(p) for p in prompts if isinstance(p, str)) > 4096
        prepared = await asyncio.to_thread(prepare) if long_text else prepare()
        queues = [self._streams.setdefault(rid, asyncio.Queue()) for rid in request_ids]
        done = False
        try:
            for item in prepared:
                self._send("add", item)
            results: list[PoolingRequestOutput] = []
            for stream in queues:
                got = await stream.get()
                if isinstance(got, BaseException):
                    raise got
                assert isinstance(got, PoolingRequestOutput)
                results.append(got)
            done = True
            return results
        finally:
            for rid in request_ids:
                self._streams.pop(rid, None)
                if not done:
                    self._send("abort", rid)

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    # -- LoRA adapters (kvik.lora) ---------------------------------------------
    async def check_lora(self, lora_request: LoRARequest) -> AdapterInfo:
        """Check an adapter against the model (reads its files off the event loop); ValueError if bad."""
        return await asyncio.to_thread(self.check_lora_blocking, lora_request)

    def check_lora_blocking(self, lora_request: LoRARequest) -> AdapterInfo:
        """:meth:`check_lora` on the calling thread (server start-up)."""
        check = self.engine.inputs.check_lora  # None when LoRA is off
        if check is None:
            raise ValueError("LoRA is off; start the engine with enable_lora=True (kvik serve --enable-lora)")
        return check(lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter on the engine's thread (False when unknown); LoRAInUseError while requests use it."""
        if self._thread is None or self._loop is None:
            return self.engine.remove_lora(lora_int_id)
        done: asyncio.Future[bool] = self._loop.create_future()
        self._send("remove_lora", (lora_int_id, done))
        self._ensure_running()  # a dead loop would never answer
        return await asyncio.wait_for(done, timeout=60.0)

    # -- the loop thread -----------------------------------------------------
    def _send(self, kind: str, payload: Any) -> None:
        """Hand a command to the loop thread: ``add``, ``abort``, ``remove_lora`` or ``wake``."""
        self._commands.put((kind, payload))

    def _deliver(self, outputs: Sequence[RequestOutput | PoolingRequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _post(self, outputs: Sequence[RequestOutput | PoolingRequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._post(self.engine.abort_request(payload))
            elif kind == "remove_lora":
                self._remove_lora(*payload)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, prepared: PreparedRequest) -> None:
        try:
            self.engine.add_prepared(prepared)
        except Exception as exc:  # e.g. the scheduler refuses it: hand the error to the caller
            error = exc
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_one, prepared.request_id, error)

    def _remove_lora(self, lora_int_id: int, done: asyncio.Future[bool]) -> None:
        assert self._loop is not None
        try:
            removed = self.engine.remove_lora(lora_int_id)
        except Exception as exc:  # LoRAInUseError: the caller answers 409
            self._loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            self._loop.call_soon_threadsafe(done.set_result, removed)

    def _fail_one(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(error)

    def _run_loop(self) -> None:
        try:
            while self._running:
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._post(self.engine.step())
                    self._post(self.engine.take_pooling_outputs())
                else:  # idle: a worker process that died must still fail the engine (and /ready) now
                    self.engine.check_health()
                self._stats = self.engine.get_stats()
        except BaseException as exc:
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """The loop is dead: fail every waiting request loudly, and every later one (``_ensure_running``)."""
        logger.exception("engine loop failed", exc_info=exc)
        self._error = exc
        if self._loop is not None:
            for request_id in list(self._streams):
                self._loop.call_soon_threadsafe(
                    self._fail_one, request_id, EngineDeadError(f"the engine loop failed: {exc!r}")
                )
