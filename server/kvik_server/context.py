"""What every handler shares: the engine, settings, admission control, tokenization and metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from kvik.outputs import RequestOutput
from kvik.sampling_params import SamplingParams
from kvik.structured.backend import FeatureNotEnabledError

from kvik_server.errors import APIError, bad_request, not_enabled
from kvik_server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class ServerSettings:
    """Server-side options (engine options live in the engine's own config)."""

    served_model_name: str | None = None
    api_keys: tuple[str, ...] = ()
    max_waiting_requests: int | None = None  # None: no back-pressure beyond the engine's queue
    max_request_body_bytes: int | None = 16 * 1024 * 1024
    shutdown_grace_period: float = 30.0  # seconds in-flight requests get after SIGTERM
    ready_stall_seconds: float = 60.0  # queued work but no engine step for this long: not ready
    max_num_seqs: int | None = None  # the engine's running-batch cap, for back-pressure estimates

    @classmethod
    def from_args(cls, args: Any) -> ServerSettings:
        """From an argparse namespace (or any object with these attribute names); missing ones keep defaults."""
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
        api_key = getattr(args, "api_key", None)
        if api_key and "api_keys" not in values:
            values["api_keys"] = tuple(api_key) if isinstance(api_key, (list, tuple)) else (api_key,)
        return cls(**values)


class ServingContext:
    """Handlers' view of the engine: admission, tokenization off the event loop, request tracking."""

    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name: str = settings.served_model_name or str(engine.model_name)
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics(engine, self.model_name, self)
        # One worker: HF fast tokenizers are not safe for concurrent mutation, and this keeps
        # long prompts from blocking the event loop without starving the engine thread of CPU.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvik-tokenizer")
        self.inflight: dict[str, float] = {}  # request id -> time.monotonic() of admission
        # Requests still waiting on the engine (the final output not yet received): /ready's view,
        # which must not blame the engine for a client that reads a finished stream slowly.
        self.engine_pending: dict[str, float] = {}
        self.inflight_seqs = 0  # sequences (n per prompt) admitted and not finished
        self.started = False
        self.draining = False
        self._shutdown_done = False
        self._max_num_seqs = settings.max_num_seqs or _engine_max_num_seqs(engine)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        self.started = True

    async def drain(self, grace_period: float) -> None:
        """Refuse new work, give in-flight requests ``grace_period`` seconds, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + grace_period
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            logger.warning("aborting %d request(s) still running after the grace period", len(self.inflight))
            # Abort through the running loop so each stream gets its final output and the
            # handler can tell its client (an error event, then [DONE]) before we close.
            for request_id in list(self.inflight):
                await self.engine.abort(request_id)
            flush_deadline = time.monotonic() + 5.0
            while self.inflight and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.05)
        logger.info("drained (%d request(s) left); stopping the engine", len(self.inflight))
        await self.shutdown_engine(0.0)
        logger.info("engine stopped")

    async def shutdown_engine(self, grace_period: float = 0.0) -> None:
        if self._shutdown_done or not self.started:
            return
        self._shutdown_done = True
        await self.engine.shutdown(grace_period)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- checks -----------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.model_name}` (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def check_length(self, prompt_len: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but your {param} resulted in "
                f"{prompt_len} tokens (the prompt plus at least one generated token must fit). "
                f"Please reduce the length of the {param}.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
                f"Please reduce the length of the {param} or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def admit(self, num_seqs: int) -> None:
        """Refuse (503 + Retry-After) when draining or when the wait queue would exceed its cap."""
        if self.draining:
            raise APIError(
                503,
                "The server is shutting down and accepts no new requests; retry on another replica.",
                code="server_shutting_down",
                headers={"Retry-After": "5"},
            )
        limit = self.settings.max_waiting_requests
        if limit is None:
            return
        stats = self.engine.get_stats()
        waiting = stats.num_waiting
        free = 0
        if self._max_num_seqs:
            # Requests admitted here but not yet in the engine's queue count as waiting too.
            waiting = max(waiting, self.inflight_seqs - self._max_num_seqs)
            free = max(0, self._max_num_seqs - self.inflight_seqs)
        if waiting + max(0, num_seqs - free) > limit:
            raise APIError(
                503,
                f"The server is overloaded: {waiting} sequences are already waiting "
                f"(--max-waiting-requests {limit}). Retry after a short wait.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )

    def sampling_params(self, build: Callable[[], SamplingParams]) -> SamplingParams:
        """Run a SamplingParams builder, turning its ValueError into a 400 naming the field."""
        try:
            return build()
        except (ValueError, TypeError) as exc:
            message = str(exc)
            param = None
            if message.startswith("SamplingParams."):
                param = message[len("SamplingParams.") :].split(" ", 1)[0]
            raise bad_request(message, param=param, code="invalid_value") from None

    # -- tokenization ------------------------------------------------------------
    async def run_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = await self.run_tokenizer(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return list(ids)

    async def decode(self, ids: list[int]) -> str:
        return str(await self.run_tokenizer(self.tokenizer.decode, ids))

    async def render_chat(
        self, messages: list[dict[str, Any]], add_special_tokens: bool = False, **kwargs: Any
    ) -> list[int]:
        """Apply the model's chat template; template problems are the client's 400."""

        def render() -> list[int]:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        try:
            return await self.run_tokenizer(render)
        except (ValueError, TypeError, KeyError) as exc:
            raise bad_request(f"Could not apply the model's chat template: {exc}", param="messages") from None
        except Exception as exc:  # jinja2 errors (raise_exception in templates, undefined variables)
            if type(exc).__module__.startswith("jinja2"):
                raise bad_request(f"Could not apply the model's chat template: {exc}", param="messages") from None
            raise

    # -- generation --------------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0
    ) -> EngineStream:
        """Start tracking one engine request (its seats count against admission at once).

        Iterate the result for cumulative RequestOutputs; close it (``aclose``) when done with
        it, which aborts the engine request if it has not finished. A ValueError from the
        engine (bad input) becomes a 400.
        """
        self.inflight[request_id] = self.engine_pending[request_id] = time.monotonic()
        self.inflight_seqs += params.n
        return EngineStream(self, prompt_ids, params, request_id, priority)

    def _release(self, request_id: str, num_seqs: int) -> None:
        self.engine_pending.pop(request_id, None)
        if self.inflight.pop(request_id, None) is not None:
            self.inflight_seqs -= num_seqs

    def busy_since(self) -> float | None:
        """time.monotonic() of the oldest request still waiting on the engine, or None."""
        return min(self.engine_pending.values(), default=None)


_NAMED_PARAM = re.compile(r"^(?:SamplingParams\.|invalid )(\w+)")


def _param_named_in(message: str) -> str | None:
    """The request field an engine error names ("invalid guided_regex: ...", "SamplingParams.top_p ...")."""
    match = _NAMED_PARAM.match(message)
    return match.group(1) if match else None


def _engine_max_num_seqs(engine: Any) -> int | None:
    for path in ("config.max_num_seqs", "engine_config.max_num_seqs", "engine.config.max_num_seqs"):
        obj: Any = engine
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, int) and obj > 0:
            return obj
    return None


class EngineStream:
    """One engine request as an async iterator that cannot leak: seats and the engine request
    are released when it finishes, fails, is cancelled, or is closed before it ever started."""

    def __init__(
        self, ctx: ServingContext, prompt_ids: list[int], params: SamplingParams, request_id: str, priority: int
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.params = params
        self._gen = self._run(prompt_ids, priority)

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> RequestOutput:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        self.ctx._release(self.request_id, self.params.n)

    async def _run(self, prompt_ids: list[int], priority: int) -> AsyncGenerator[RequestOutput, None]:
        ctx, request_id = self.ctx, self.request_id
        arrival = time.time()
        first_token: float | None = None
        finished = False
        try:
            try:
                async for output in ctx.engine.generate(prompt_ids, self.params, request_id, priority=priority):
                    if first_token is None and any(c.token_ids for c in output.outputs):
                        first_token = time.time()
                    if output.finished:
                        finished = True
                        ctx.engine_pending.pop(request_id, None)
                        ctx.metrics.observe_finished(output, arrival, first_token, time.time())
                    yield output
            except FeatureNotEnabledError as exc:
                raise not_enabled(exc) from None
            except ValueError as exc:
                raise bad_request(str(exc), param=_param_named_in(str(exc)), code="invalid_value") from None
            except RuntimeError as exc:
                if type(exc).__name__ != "EngineDeadError":
                    raise
                # The loop died or is shutting down: this replica cannot serve, others may.
                raise APIError(
                    503,
                    f"The engine cannot take requests: {exc}",
                    code="engine_unavailable",
                    headers={"Retry-After": "5"},
                ) from None
        finally:
            ctx._release(request_id, self.params.n)
            if not finished:
                # Shielded: under a cancelled anyio scope every await would be cancelled again.
                with anyio.CancelScope(shield=True):
                    await ctx.engine.abort(request_id)
