"""What every handler shares: the engine, settings, admission control, tokenization and metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from kvik.lora.request import LoRARequest
from kvik.outputs import RequestOutput
from kvik.sampling_params import SamplingParams
from kvik.structured.backend import FeatureNotEnabledError

from kvik_server.admission import AdmissionLedger, KVCapacity
from kvik_server.chat_template import RenderTimeout, RenderWatchdog, request_template
from kvik_server.errors import APIError, bad_request, not_enabled
from kvik_server.json_body import check_text
from kvik_server.lora_modules import LoRAModule, LoRAModules, parse_lora_module
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
    trust_request_chat_template: bool = False  # render chat templates sent in requests (chat_template.py)
    chat_template_timeout: float = 2.0  # seconds one chat-template render may take
    max_template_chars: int | None = None  # rendered-prompt cap; None: ServingContext.max_template_chars
    # tool calling and reasoning output (docs/tool_calling.md)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    ui: bool = True  # serve the chat page at / (kvik_server/ui); --no-ui turns it off
    # LoRA adapters served by name (docs/lora.md): "name=path" entries, and run-time loading on/off
    lora_modules: tuple[str, ...] = ()
    allow_runtime_lora_updating: bool = False

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
        if "lora_modules" in values:
            values["lora_modules"] = tuple(values["lora_modules"])
        return cls(**values)


class ServingContext:
    """Handlers' view of the engine: admission, tokenization off the event loop, request tracking."""

    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name: str = settings.served_model_name or str(engine.model_name)
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics(engine, self.model_name, self)
        config = getattr(engine, "config", None)
        self.loras = LoRAModules(
            engine, self.model_name, bool(getattr(config, "enable_lora", False)), settings.allow_runtime_lora_updating
        )
        modules: list[LoRAModule] = [parse_lora_module(m) for m in settings.lora_modules]
        self.loras.load_static(modules)
        self._lora_of: dict[str, str] = {}  # request id -> the adapter name it runs under
        # One worker: HF fast tokenizers are not safe for concurrent mutation, and this keeps
        # long prompts from blocking the event loop without starving the engine thread of CPU.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvik-tokenizer")
        self._watchdog = RenderWatchdog()
        self.inflight: dict[str, float] = {}  # request id -> time.monotonic() of admission
        # Requests still waiting on the engine (the final output not yet received): /ready's view,
        # which must not blame the engine for a client that reads a finished stream slowly.
        self.engine_pending: dict[str, float] = {}
        self.started = False
        self.draining = False
        self._shutdown_done = False
        self.admission = AdmissionLedger(engine.config.max_num_seqs, _kv_capacity(engine))

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
    def check_model(self, model: str | None) -> LoRARequest | None:
        """The adapter the request's ``model`` names (None: the base model); 404 for an unknown model."""
        return self.loras.resolve(model)

    def served_name(self, model: str | None) -> str:
        """The ``model`` a response reports: the adapter's name when the request named one, else the served name."""
        return model if model is not None and model in self.loras.adapters else self.model_name

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

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """400 for ids the tokenizer cannot decode (negative, past its vocabulary, or beyond 64 bits)."""
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(
                f"token ids {bad[:5]} in '{param}' are outside the vocabulary [0, {vocab}).",
                param=param,
                code="invalid_value",
            )

    def admit(self, n: int, prompt_lens: Sequence[int]) -> None:
        """Refuse (503 + Retry-After) when draining, or when admitting these prompts (``n`` sequences
        each) would leave more than ``--max-waiting-requests`` sequences waiting (admission.py).

        Call it right before :meth:`generate`, with no ``await`` between: the two together are one step
        of the event loop, so a burst of requests is counted one by one.
        """
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
        reported = self.engine.get_stats().num_waiting  # as of the engine's last step
        waiting = max(self.admission.num_waiting(), reported)
        if max(self.admission.num_waiting([(length, n) for length in prompt_lens]), reported) > limit:
            raise APIError(
                503,
                f"The server is overloaded: {waiting} sequences are already waiting for the running batch "
                f"(--max-waiting-requests {limit}). Retry after a short wait.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )

    def sampling_params(self, build: Callable[[], SamplingParams], stream: bool) -> SamplingParams:
        """Run a SamplingParams builder, turning its ValueError into a 400 naming the field.

        A response that is not streamed asks the engine for the final output only: cumulative
        outputs cost an event-loop wake-up and a detokenization per request per step, which held
        ``kvik run-batch`` (whose requests all take this path) to 0.59x ``LLM.generate`` on an H200.
        """
        try:
            params = build()
            return params if stream else params.clone(output_kind="final_only")
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

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        check_text(text, param)
        try:
            ids = await self.run_tokenizer(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        except (TypeError, UnicodeEncodeError) as exc:  # what HF tokenizers raise for text they cannot take
            raise bad_request(f"The tokenizer could not encode the {param}: {exc}", param=param) from None
        return list(ids)

    async def decode(self, ids: list[int]) -> str:
        return str(await self.run_tokenizer(self.tokenizer.decode, ids))

    async def render_chat(
        self, messages: list[dict[str, Any]], add_special_tokens: bool = False, **kwargs: Any
    ) -> list[int]:
        """Apply the chat template (the model's, or the request's when trusted) within the render limits
        of chat_template.py; template problems are the client's 400."""
        if request_template(kwargs) is not None and not self.settings.trust_request_chat_template:
            raise bad_request(
                "This server does not render chat templates sent in requests (a template is code the server "
                "would run); drop 'chat_template' to use the model's own. The operator can allow them with "
                "--trust-request-chat-template.",
                param="chat_template",
                code="unsupported_parameter",
            )
        timeout, max_chars = self.settings.chat_template_timeout, self.max_template_chars

        def render() -> list[int]:
            text = self._watchdog.run(
                lambda: self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs), timeout
            )
            if len(text) > max_chars:
                raise bad_request(
                    f"The chat template rendered {len(text)} characters, more than the limit of {max_chars} "
                    f"(no prompt that long fits the model's context of {self.max_model_len} tokens).",
                    param="messages",
                    code="context_length_exceeded",
                )
            check_text(text, "messages")
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        try:
            return await self.run_tokenizer(render)
        except RenderTimeout:
            raise bad_request(
                f"The chat template took more than {timeout:g}s to render; the server stopped it.", param="messages"
            ) from None
        except (ValueError, TypeError, KeyError, RecursionError, MemoryError) as exc:
            raise bad_request(f"Could not apply the chat template: {exc}", param="messages") from None
        except Exception as exc:  # jinja2 errors (raise_exception in templates, undefined variables, SecurityError)
            if type(exc).__module__.startswith("jinja2"):
                raise bad_request(f"Could not apply the chat template: {exc}", param="messages") from None
            raise

    @property
    def max_template_chars(self) -> int:
        """The rendered-prompt size cap: a setting, else 64 characters per token of context (at least 1 MiB)."""
        return self.settings.max_template_chars or max(1 << 20, 64 * self.max_model_len)

    # -- generation --------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> EngineStream:
        """Start tracking one engine request (its seats count against admission at once).

        Iterate the result for cumulative RequestOutputs; close it (``aclose``) when done with
        it, which aborts the engine request if it has not finished. A ValueError from the
        engine (bad input) becomes a 400.
        """
        self.inflight[request_id] = self.engine_pending[request_id] = time.monotonic()
        self.admission.add(request_id, len(prompt_ids), params.n)
        if lora_request is not None:
            self._lora_of[request_id] = lora_request.lora_name
            self.loras.in_flight[lora_request.lora_name] += 1
        return EngineStream(self, prompt_ids, params, request_id, priority, lora_request)

    def _finished(self, request_id: str) -> None:
        """The engine is done with the request (its client may still be reading)."""
        self.engine_pending.pop(request_id, None)
        self.admission.remove(request_id)

    def _release(self, request_id: str) -> None:
        self._finished(request_id)
        self.inflight.pop(request_id, None)
        name = self._lora_of.pop(request_id, None)
        if name is not None:
            self.loras.in_flight[name] -= 1

    def busy_since(self) -> float | None:
        """time.monotonic() of the oldest request still waiting on the engine, or None."""
        return min(self.engine_pending.values(), default=None)


_NAMED_PARAM = re.compile(r"^(?:SamplingParams\.|invalid )(\w+)")


def _param_named_in(message: str) -> str | None:
    """The request field an engine error names ("invalid guided_regex: ...", "SamplingParams.top_p ...")."""
    match = _NAMED_PARAM.match(message)
    return match.group(1) if match else None


def _kv_capacity(engine: Any) -> KVCapacity | None:
    """The KV cache an AsyncLLM's engine planned, in its process or another (None for engines that do not
    say: LLMEngine.kv_capacity)."""
    planned = getattr(getattr(engine, "engine", None), "kv_capacity", None)
    if not isinstance(planned, tuple):
        return None
    num_blocks, block_size, prefix_caching = planned
    return KVCapacity(num_blocks, block_size, prefix_caching)


class EngineStream:
    """One engine request as an async iterator that cannot leak: seats and the engine request
    are released when it finishes, fails, is cancelled, or is closed before it ever started."""

    def __init__(
        self,
        ctx: ServingContext,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        priority: int,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self.params = params
        self.lora_request = lora_request
        self._gen = self._run(prompt_ids, priority)

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> RequestOutput:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()
        self.ctx._release(self.request_id)

    async def _run(self, prompt_ids: list[int], priority: int) -> AsyncGenerator[RequestOutput, None]:
        ctx, request_id = self.ctx, self.request_id
        arrival = time.time()
        first_token: float | None = None
        finished = False
        try:
            try:
                lora = {"lora_request": self.lora_request} if self.lora_request is not None else {}
                async for output in ctx.engine.generate(prompt_ids, self.params, request_id, priority=priority, **lora):
                    if first_token is None and any(c.token_ids for c in output.outputs):
                        first_token = time.time()
                    if output.finished:
                        finished = True
                        ctx._finished(request_id)
                        name = self.lora_request.lora_name if self.lora_request is not None else None
                        ctx.metrics.observe_finished(output, arrival, first_token, time.time(), name)
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
            ctx._release(request_id)
            if not finished:
                # Shielded: under a cancelled anyio scope every await would be cancelled again.
                with anyio.CancelScope(shield=True):
                    await ctx.engine.abort(request_id)
