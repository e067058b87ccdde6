"""Chat-template rendering with limits: which request keys may reach the template, whether a request may
bring its own template, and a time bound on every render.

A chat template is Jinja code. transformers' ``apply_chat_template`` compiles it in jinja2's
``ImmutableSandboxedEnvironment`` (no attribute access to Python internals, no mutation of the data
passed in, ``range`` capped at 100,000), which stops escapes but not cost: ~250 bytes of nested loops
render megabytes. So:

- a template in the request (``chat_template``, in the body or in ``chat_template_kwargs``) is refused
  unless the operator passes ``--trust-request-chat-template`` (vLLM's rule);
- every render (the model's own template too) runs under :class:`RenderWatchdog`, which interrupts
  it after a deadline, and its output is capped in size before it is tokenized.

The watchdog interrupts Python code (the compiled template is Python): one huge C-level operation such
as ``"x" * 10**10`` runs to its end (or to a MemoryError) first, so trust request templates only from
clients you trust.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# apply_chat_template's own parameters and the names it passes to the template itself: a
# chat_template_kwargs key among them would collide ("got multiple values for keyword argument").
# tests/server check this list against the installed transformers' signature.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "conversations", "messages", "tools", "documents", "add_generation_prompt",
     "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
     "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip
REQUEST_TEMPLATE_KEY = "chat_template"
WATCHDOG_POLL_S = 0.05  # how late a render deadline may fire (RenderWatchdog)


def check_template_kwargs(kwargs: Mapping[str, Any]) -> None:
    """ValueError naming the ``chat_template_kwargs`` keys that the renderer sets itself."""
    clashing = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS)
    if clashing:
        raise ValueError(
            f"these keys are set by the server or by request fields of their own and cannot be passed as "
            f"template variables: {', '.join(clashing)} (use the request fields messages, add_generation_prompt, "
            "continue_final_message instead)"
        )


def request_template(kwargs: Mapping[str, Any]) -> Any:
    """The template a request brings (``chat_template`` among the template arguments), or None."""
    return kwargs.get(REQUEST_TEMPLATE_KEY)


class RenderTimeout(BaseException):
    """Raised inside a render that ran past its deadline (a BaseException so no ``except Exception``
    in library code swallows it)."""


def _raise_in_thread(thread_id: int, exc: type[BaseException] | None) -> None:
    # CPython delivers it at the thread's next bytecode boundary; None clears a pending one.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class RenderWatchdog:
    """One daemon thread that interrupts the render in progress once its deadline passes.

    ``run(fn, timeout)`` is called from the tokenizer worker (one render at a time); it returns
    ``fn()`` or raises :class:`RenderTimeout`. Arming, firing and disarming hold one lock, so an
    interrupt can never land after ``run`` has returned.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._target: tuple[int, float] | None = None  # (thread id, time.monotonic() deadline)
        self._fired = False
        self._thread: threading.Thread | None = None
        self._sleeping = False  # the watchdog waits for a render to arm it (no deadline to poll)
        self._arms = 0  # renders armed so far (the watchdog sleeps after a poll period with none)

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        self._arm(threading.get_ident(), time.monotonic() + timeout)
        interrupted = False
        try:
            return fn()
        except RenderTimeout:
            interrupted = True
            raise
        finally:
            while True:  # the interrupt may land inside this block too: retry until disarmed
                try:
                    fired = self._disarm()
                    break
                except RenderTimeout:
                    interrupted = True
            if fired and not interrupted:
                raise RenderTimeout  # the deadline passed as fn returned: still over the bound

    def _arm(self, thread_id: int, deadline: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="kvik-template-watchdog", daemon=True)
                self._thread.start()
            self._target, self._fired = (thread_id, deadline), False
            self._arms += 1
            if self._sleeping:  # a burst of renders wakes it once; then it polls (see _watch)
                self._cond.notify()

    def _disarm(self) -> bool:
        with self._cond:
            target, self._target = self._target, None
            if self._fired and target is not None:
                _raise_in_thread(target[0], None)  # fired but not yet delivered: take it back
            return self._fired

    def _watch(self) -> None:
        # While renders keep coming it polls every WATCHDOG_POLL_S instead of being woken by each one:
        # every wake-up takes the GIL from the engine's thread, and `kvik run-batch` renders hundreds a
        # second (2,500 wake-ups in a 512-request batch on an H200). A deadline fires at most one poll late.
        seen = -1
        with self._cond:
            while True:
                if self._target is None:
                    if self._arms == seen:  # a whole poll period without a render: sleep until the next
                        self._sleeping = True
                        self._cond.wait()
                        self._sleeping = False
                    else:
                        seen = self._arms
                        self._cond.wait(WATCHDOG_POLL_S)
                    continue
                thread_id, deadline = self._target
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not self._fired:
                    self._fired = True
                    _raise_in_thread(thread_id, RenderTimeout)
                    continue
                self._cond.wait(WATCHDOG_POLL_S if remaining <= 0 else min(WATCHDOG_POLL_S, remaining))
