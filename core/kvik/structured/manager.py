"""The engine's structured-output state: compiled-grammar cache, per-request matchers, per-step bitmasks.

Flow per engine step:

1. after ``schedule()``, :meth:`StructuredOutputManager.start_step` submits the
   step's bitmask (one row per constrained request that samples this step) to a
   worker thread and hangs a :class:`StructuredStep` on the SchedulerOutput;
2. the runner runs the model meanwhile, and calls ``StructuredStep.bitmask()``
   only when it reaches sampling: the mask was computed while the forward ran
   (the grammar state cannot change in between: it advances only after sampling);
3. after ``update_from_output()``, :meth:`accept` advances each matcher by its
   request's new tokens and returns the requests whose grammar terminated.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvik.request import Request
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import SchedulerOutput
from kvik.structured.backend import FeatureNotEnabledError, GrammarMatcher, StructuredOutputBackend

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StructuredStep:
    """The constrained requests of one step and their bitmask (being computed off-thread)."""

    request_ids: list[str]
    future: Future[np.ndarray]

    def bitmask(self) -> np.ndarray:
        """[len(request_ids), ceil(vocab / 32)] int32; waits for the worker thread if needed."""
        return self.future.result()


@dataclass(slots=True)
class _Tracked:
    matcher: GrammarMatcher
    num_accepted: int = 0  # output tokens seen (fed to the matcher once it started)
    waiting_for: int | None = None  # SamplingParams.guided_after_token_id until it is generated


def normalize_spec(kind: str, spec: Any) -> Any:
    """A hashable, canonical form of a constraint (the compile cache's key)."""
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid guided_json: not valid JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"invalid guided_json: a JSON schema must be an object, got {type(spec).__name__}")
        # Key order is kept: properties are generated in the schema's order (as OpenAI does).
        return json.dumps(spec, separators=(",", ":"), ensure_ascii=False)
    if kind == "choice":
        return tuple(spec)
    if kind == "json_object":
        return ""
    return spec


@dataclass
class StructuredOutputManager:
    """Owns one backend (built lazily), the LRU cache of compiled grammars and the live matchers."""

    tokenizer: Any
    vocab_size: int
    eos_token_ids: frozenset[int]
    plugin_manager: Any  # kvik.plugins.manager.PluginManager
    backend_name: str = "xgrammar"
    cache_size: int = 256
    _backend: StructuredOutputBackend | None = field(default=None, init=False)
    _cache: OrderedDict[tuple[str, Any], Any] = field(default_factory=OrderedDict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _tracked: dict[str, _Tracked] = field(default_factory=dict, init=False)
    _pending: Future[np.ndarray] | None = field(default=None, init=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False)

    # -- admission (any thread) ------------------------------------------------------
    @property
    def backend(self) -> StructuredOutputBackend:
        with self._lock:
            if self._backend is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs a tokenizer; this engine has none")
                try:
                    cls = self.plugin_manager.structured_output_backends.get(self.backend_name)
                    self._backend = cls(self.tokenizer, self.vocab_size, self.eos_token_ids)
                except ImportError as exc:
                    raise FeatureNotEnabledError(
                        f"structured output is not enabled on this server (its {self.backend_name!r} backend "
                        "is not installed)",
                        f"to enable it: pip install 'kvik-core[structured]' ({exc})",
                    ) from exc
            return self._backend

    def compile(self, params: SamplingParams) -> Any | None:
        """The compiled constraint of ``params`` (None without one); ValueError if it does not compile."""
        guided = params.guided
        if guided is None:
            return None
        kind, spec = guided
        key = (kind, normalize_spec(kind, spec))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self.backend.compile(kind, list(key[1]) if kind == "choice" else key[1])
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    # -- engine thread -------------------------------------------------------------
    def add_request(self, request_id: str, params: SamplingParams) -> None:
        compiled = self.compile(params)
        if compiled is not None:
            matcher = self.backend.new_matcher(compiled)
            self._tracked[request_id] = _Tracked(matcher, waiting_for=params.guided_after_token_id)

    def remove(self, request_ids: Iterable[str]) -> None:
        self._wait()
        for request_id in request_ids:
            self._tracked.pop(request_id, None)

    def start_step(self, scheduler_output: SchedulerOutput) -> StructuredStep | None:
        """Submit this step's bitmask computation; None when no sampling request is constrained."""
        if not self._tracked:
            return None
        tracked = self._tracked
        ids = [s.request_id for s in scheduler_output.scheduled
               if s.sample and s.request_id in tracked and tracked[s.request_id].waiting_for is None]  # fmt: skip
        if not ids:
            return None
        matchers = [self._tracked[i].matcher for i in ids]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvik-grammar")
        self._pending = self._pool.submit(self._fill, matchers)
        return StructuredStep(ids, self._pending)

    def _fill(self, matchers: list[GrammarMatcher]) -> np.ndarray:
        bitmask = self.backend.allocate_bitmask(len(matchers))
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)
        return bitmask

    def _wait(self) -> None:
        # Matchers are not thread-safe: never advance one while a bitmask fill may read it.
        if self._pending is not None:
            self._pending.exception()
            self._pending = None

    def accept(self, updated: list[Request]) -> list[str]:
        """Advance matchers by the new tokens; return ids whose grammar terminated (or rejected a token).

        Finished requests are forgotten.
        """
        if not self._tracked:
            return []
        self._wait()
        done = []
        for request in updated:
            tracked = self._tracked.get(request.request_id)
            if tracked is None:
                continue
            new = request.output_token_ids[tracked.num_accepted :]
            tracked.num_accepted += len(new)
            if tracked.waiting_for is not None:  # free until the start token; the grammar takes what follows
                if tracked.waiting_for in new:
                    new = new[list(new).index(tracked.waiting_for) + 1 :]
                    tracked.waiting_for = None
                else:
                    new = []
            for token in new:
                if not tracked.matcher.accept_token(token):
                    logger.warning("request %s: token %d breaks its grammar; stopping it", request.request_id, token)
                    done.append(request.request_id)
                    break
                if tracked.matcher.is_terminated():
                    done.append(request.request_id)
                    break
            if request.is_finished or (done and done[-1] == request.request_id):
                del self._tracked[request.request_id]
        return done

    def shutdown(self) -> None:
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
