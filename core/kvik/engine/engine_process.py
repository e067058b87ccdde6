"""An engine stepping in a process of its own, so that its step loop has an interpreter lock to itself.

With a small model the engine's step is mostly Python (scheduling, inputs, outputs around a ~1 ms GPU
step), and request handling on the same interpreter lock (the server's or ``kvik run-batch``'s
validation, templates and response bodies) slows every step down: on the SmolLM2 shape run-batch
ran at 0.83x ``LLM.chat`` with both in one process (docs/benchmarks.md, issue 19). vLLM runs its
engine core in its own process for the same reason.

Here a child process (started with ``spawn``: CUDA does not survive ``fork``) builds the
:class:`~kvik.engine.llm_engine.LLMEngine` and steps it. The caller's process keeps an
:class:`~kvik.engine.input_processor.InputProcessor` of its own (the child sends the configs and
the tokenizer once it is ready), so tokenizing and validating stay on the caller's side, and only
prepared requests cross. Two one-way pipes carry pickled messages:

- to the engine: ``("add", PreparedRequest)``, ``("abort", request_id)``, ``("call", (call_id, name,
  args))`` (the LoRA checks), ``("stop", None)``;
- from the engine: ``("ready", EngineInfo)`` or ``("start_failed", error)`` once, then ``("outputs",
  (outputs, stats))``, ``("failed", (request_id, error))`` (a request the scheduler refused),
  ``("reply", (call_id, ok, value))`` and, if the loop dies, ``("dead", error)``.

The child ignores SIGINT (the caller decides when to stop it) and exits when its command pipe closes,
so it never outlives the caller. :class:`ProcessAsyncLLM` is :class:`~kvik.engine.async_llm.AsyncLLM`
over such a child; ``AsyncLLM.from_engine_args(..., engine_process=True)`` builds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import multiprocessing
import multiprocessing.util
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from kvik.config import EngineConfig, ModelConfig, ResolvedConfig
from kvik.engine.async_llm import AsyncLLM, EngineDeadError
from kvik.engine.input_processor import InputProcessor, PreparedRequest
from kvik.engine.llm_engine import EngineStats, LLMEngine
from kvik.entrypoints.frozen_heap import freeze_for_life
from kvik.lora.request import LoRARequest
from kvik.outputs import CompletionOutput, RequestOutput
from kvik.pooling.params import PoolingParams
from kvik.pooling.setup import PoolerSetup
from kvik.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # an idle engine waits this long for a command before checking its health again
_STATS_EVERY_S = 0.1  # stats with no outputs to carry them are sent at most this often
_CALL_TIMEOUT_S = 60.0


@dataclass
class EngineInfo:
    """What the caller's side needs from the loaded engine: its configs, tokenizer and abilities."""

    config: ResolvedConfig
    model_config: ModelConfig
    tokenizer: Any
    platform_name: str
    structured_output: bool
    pooler_setup: PoolerSetup | None
    pooling_task: str
    lora_enabled: bool
    stats: EngineStats
    kv_capacity: tuple[int, int, bool]  # LLMEngine.kv_capacity


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


# -- the child -------------------------------------------------------------------------------------
def _check_lora(engine: LLMEngine, lora_request: LoRARequest) -> Any:
    # Asked only when LoRA is on: the caller's InputProcessor has no check_lora otherwise.
    assert engine.loras is not None
    return engine.loras.check(lora_request)


# The calls the caller's side may make on the engine between steps.
_CALLS: dict[str, Callable[..., Any]] = {"check_lora": _check_lora, "remove_lora": LLMEngine.remove_lora}


def _engine_main(engine_kwargs: dict[str, Any], commands: Connection, results: Connection, log: tuple[int, str]) -> None:
    """The child's whole life: build the engine, report ready (or why not), step until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level, fmt = log
    logging.basicConfig(level=level, format=fmt)
    try:
        engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs))
    except BaseException as exc:
        results.send(("start_failed", _portable(exc)))
        return
    # This process lives for the engine: its heap as it is now (modules, model, tokenizer) is permanent, so
    # freeze it, or every full collection walks all of it while the steps wait (kvik.entrypoints.frozen_heap).
    freeze_for_life()
    # The model's source (its format's readers) stays here: the caller's side reads no weights.
    model_config = replace(engine.model_config, source=None)
    results.send(("ready", EngineInfo(engine.config, model_config, engine.tokenizer, engine.platform.name,
                                      engine.inputs.structured_output, engine.pooler_setup, engine.pooling_task,
                                      engine.loras is not None, engine.get_stats(), engine.kv_capacity)))  # fmt: skip
    try:
        _serve(engine, commands, results)
    except BaseException as exc:  # the loop is dead: say why before the pipe closes
        logger.exception("engine loop failed")
        with contextlib.suppress(OSError):
            results.send(("dead", _portable(exc)))
    finally:
        engine.shutdown()


def _serve(engine: LLMEngine, commands: Connection, results: Connection) -> None:
    last_stats: EngineStats | None = None
    stats_due = 0.0
    while True:
        busy = engine.has_unfinished_requests()
        if commands.poll(0 if busy else _IDLE_WAIT_S) and _drain(engine, commands, results):
            return
        outputs: list[Any] = []
        if engine.has_unfinished_requests():
            outputs.extend(engine.step())
            outputs.extend(engine.take_pooling_outputs())
        else:  # idle: a worker process that died must still fail the engine now
            engine.check_health()
        now = time.monotonic()
        if outputs or now >= stats_due:
            stats = engine.get_stats()
            if outputs or stats != last_stats:
                results.send(("outputs", (outputs, stats)))
                last_stats, stats_due = stats, now + _STATS_EVERY_S


def _drain(engine: LLMEngine, commands: Connection, results: Connection) -> bool:
    """Apply every waiting command; True when the engine must stop (told to, or the caller is gone)."""
    while commands.poll():
        try:
            kind, payload = commands.recv()
        except EOFError:
            return True
        if kind == "add":
            try:
                engine.add_prepared(payload)
            except Exception as exc:  # e.g. the scheduler refuses it: the caller's request fails
                results.send(("failed", (payload.request_id, _portable(exc))))
        elif kind == "abort":
            aborted = engine.abort_request(payload)
            if aborted:
                results.send(("outputs", (aborted, engine.get_stats())))
        elif kind == "call":
            call_id, name, args = payload
            try:
                value = _CALLS[name](engine, *args)
            except Exception as exc:
                results.send(("reply", (call_id, False, _portable(exc))))
            else:
                results.send(("reply", (call_id, True, value)))
        elif kind == "stop":
            return True
    return False


# -- the caller's side -----------------------------------------------------------------------------
class EngineProcess:
    """The caller's handle on an engine in a child process: its inputs, its pipes and its calls.

    Exposes what the server and :class:`~kvik.engine.async_llm.AsyncLLM` read of an engine
    (``config``, ``model_config``, ``tokenizer``, ``pooling_task``, ``prepare_request``, ...)."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("spawn")
        command_reader, self._commands = ctx.Pipe(duplex=False)
        self._results, results_writer = ctx.Pipe(duplex=False)
        root = logging.getLogger()
        fmt = root.handlers[0].formatter._fmt if root.handlers and root.handlers[0].formatter else None
        log = (root.getEffectiveLevel(), fmt or logging.BASIC_FORMAT)
        self.process = ctx.Process(
            target=_engine_main, args=(engine_kwargs, command_reader, results_writer, log), name="kvik-engine"
        )
        # Not a daemon: an engine with several ranks starts worker processes of its own.
        self.process.start()
        # While the child loads, import what unpickling its reply will need (the configs' and the tokenizer's
        # classes, torch under them). After the wait, that took ~2 s of a `kvik serve` start on the
        # development VM.
        threading.Thread(target=_preimport, name="kvik-preimport", daemon=True).start()
        command_reader.close()
        results_writer.close()  # the child's end: EOF here once the child is gone
        self._send_lock = threading.Lock()
        self._calls: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._call_ids = itertools.count()
        self._closed = False
        # Interpreter exit joins non-daemon children: the pipe must close before that, or the join waits
        # forever. multiprocessing runs finalizers with an exit priority first (and this one on collection).
        self._finalizer = multiprocessing.util.Finalize(self, _close_pipe, args=(self._commands,), exitpriority=10)
        try:
            kind, payload = self._results.recv()
        except EOFError:
            self.process.join(5.0)
            raise RuntimeError(
                f"the engine process exited (code {self.process.exitcode}) before it was ready; see its log above"
            ) from None
        if kind == "start_failed":
            self.process.join(10.0)
            raise payload
        info: EngineInfo = payload
        self.config = info.config
        self.model_config = info.model_config
        self.tokenizer = info.tokenizer
        self.pooler_setup = info.pooler_setup
        self.pooling_task = info.pooling_task
        self.stats = info.stats
        self.kv_capacity = info.kv_capacity
        from kvik.plugins.manager import get_plugin_manager
        from kvik.structured.manager import StructuredOutputManager

        structured = StructuredOutputManager(
            self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids, get_plugin_manager()
        )
        self.inputs = InputProcessor(
            config=self.config,
            model_config=self.model_config,
            tokenizer=self.tokenizer,
            platform_name=info.platform_name,
            structured_output=info.structured_output,
            structured=structured,
            pooler_setup=self.pooler_setup,
            pooling_task=self.pooling_task,
            check_lora=self.check_lora if info.lora_enabled else None,
        )

    # -- requests (validated here, on the caller's side) ------------------------------------------
    def prepare_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> PreparedRequest:
        if params is not None and params.logits_processors:
            raise ValueError(
                "logits_processors (Python callables) cannot be sent to an engine in its own process; "
                "run the engine in this process to use them"
            )
        return self.inputs.prepare_request(request_id, prompt, params, priority, arrival_time, lora_request)

    def prepare_pooling_requests(
        self, request_ids: Sequence[str], prompts: Sequence[str | Sequence[int]], params: Sequence[PoolingParams]
    ) -> list[PreparedRequest]:
        return self.inputs.prepare_pooling_requests(request_ids, prompts, params)

    def get_stats(self) -> EngineStats:
        return self.stats

    # -- the pipes -------------------------------------------------------------------------------
    def send(self, kind: str, payload: Any) -> None:
        """Queue a command for the engine (from any thread); EngineDeadError once the engine is gone."""
        try:
            with self._send_lock:
                self._commands.send((kind, payload))
        except (OSError, ValueError) as exc:  # a broken or closed pipe: the child has exited
            raise EngineDeadError(f"the engine process is gone (exit code {self.process.exitcode})") from exc

    def receive(self) -> tuple[str, Any]:
        """The engine's next message (blocks); EOFError once the child has exited."""
        kind, payload = self._results.recv()
        if kind == "reply":
            call_id, ok, value = payload
            waiter = self._calls.pop(call_id, None)
            if waiter is not None:
                waiter[1].extend((ok, value))
                waiter[0].set()
        return kind, payload

    def call(self, name: str, *args: Any) -> Any:
        """Run one of the engine's between-step calls in the child and return its result (or raise its error)."""
        call_id = next(self._call_ids)
        done, answer = threading.Event(), list[Any]()
        self._calls[call_id] = (done, answer)
        self.send("call", (call_id, name, args))
        deadline = time.monotonic() + _CALL_TIMEOUT_S
        while not done.wait(0.1):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self._calls.pop(call_id, None)
                raise EngineDeadError(f"the engine process did not answer {name}() (exit code {self.process.exitcode})")
        ok, value = answer
        if not ok:
            raise value
        return value

    def check_lora(self, lora_request: LoRARequest) -> Any:
        """Check an adapter against the model (in the child, which holds the runner); ValueError if bad."""
        return self.call("check_lora", lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return bool(self.call("remove_lora", lora_int_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child (it finishes no request: abort them first) and wait for it; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(EngineDeadError):
            self.send("stop", None)
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self.process.terminate()
            self.process.join(5.0)
        self._finalizer()


# What unpickling an EngineInfo imports (transformers imports its classes lazily, on first use).
_REPLY_MODULES = ("torch", "transformers.configuration_utils", "transformers.tokenization_utils_base")


def _preimport() -> None:
    for name in _REPLY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _close_pipe(connection: Connection) -> None:
    connection.close()


def _empty_output(prepared: PreparedRequest) -> RequestOutput:
    """A generation request's cumulative output before its first token: every sample, empty."""
    params = prepared.params
    logprobs = params.logprobs is not None  # as the output processor's cumulative outputs have them
    completions = [CompletionOutput(i, "", [], 0.0 if logprobs else None, [] if logprobs else None) for i in range(params.n)]
    return RequestOutput(prepared.request_id, prepared.prompt, prepared.prompt_token_ids, completions, False)


class ProcessAsyncLLM(AsyncLLM):
    """:class:`AsyncLLM` over an engine in a child process (:class:`EngineProcess`): the same requests,
    streams, aborts and errors; the loop thread here only reads the child's messages."""

    engine: EngineProcess  # type: ignore[assignment]

    def __init__(self, engine: EngineProcess, model_name: str | None = None) -> None:
        super().__init__(engine, model_name)  # type: ignore[arg-type]
        # Streams asking for cumulative outputs cross the pipe as deltas (each step's new tokens and text,
        # not everything so far, which would be pickled again at every step); here each is folded into
        # the request's output so far. Request id -> that output.
        self._cumulative: dict[str, RequestOutput] = {}

    @classmethod
    def from_engine_args(cls, model_name: str | None = None, engine_process: bool = True, **kwargs: Any) -> ProcessAsyncLLM:
        return cls(EngineProcess(kwargs), model_name=model_name)

    def _send(self, kind: str, payload: Any) -> None:
        if kind == "wake":  # the reader needs no waking: the child's stop ends its pipe
            return
        if (
            kind == "add"
            and isinstance(payload, PreparedRequest)
            and payload.pooling_params is None
            and payload.params.output_kind == "cumulative"
        ):
            self._cumulative[payload.request_id] = _empty_output(payload)
            payload = replace(payload, params=payload.params.clone(output_kind="delta"))
        try:
            self.engine.send(kind, payload)
        except EngineDeadError:
            if kind != "abort":  # a dead engine runs nothing: there is nothing to abort
                raise

    def _stop_loop(self) -> None:
        self.engine.shutdown()
        if self._thread is not None:
            self._thread.join(10.0)

    async def remove_lora(self, lora_int_id: int) -> bool:
        self._ensure_running()
        return await asyncio.to_thread(self.engine.remove_lora, lora_int_id)

    def _cumulated(self, output: Any) -> Any:
        """A cumulative stream's output so far, with ``output`` (its step's delta) folded in; any other
        output as it came. A copy: the reader thread keeps folding while the stream reads the last one."""
        so_far = self._cumulative.get(output.request_id) if isinstance(output, RequestOutput) else None
        if so_far is None:
            return output
        so_far.add(output)
        if output.finished:
            del self._cumulative[output.request_id]
        # add() rebinds the lists and strings it extends, so the copy shares them. Positional arguments (their
        # order is asserted in kvik.outputs): this runs for every stream at every step. The samples stay in
        # index order: _empty_output seeded them all.
        completions = [
            CompletionOutput(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
            for c in so_far.outputs
        ]
        return RequestOutput(
            so_far.request_id, so_far.prompt, so_far.prompt_token_ids, completions, so_far.finished,
            so_far.metrics, so_far.prompt_logprobs, so_far.num_cached_tokens,
        )  # fmt: skip

    def _run_loop(self) -> None:
        engine = self.engine
        try:
            while True:
                try:
                    kind, payload = engine.receive()
                except EOFError:
                    if not self._running:
                        return  # stopped by shutdown()
                    raise EngineDeadError(
                        f"the engine process exited unexpectedly (exit code {engine.process.exitcode})"
                    ) from None
                if kind == "outputs":
                    outputs, self._stats = payload
                    engine.stats = self._stats
                    self._post([self._cumulated(out) for out in outputs] if self._cumulative else outputs)
                elif kind == "failed" and self._loop is not None:
                    self._cumulative.pop(payload[0], None)
                    self._loop.call_soon_threadsafe(self._fail_one, *payload)
                elif kind == "dead":
                    raise payload
        except BaseException as exc:
            self._fail_all(exc)
