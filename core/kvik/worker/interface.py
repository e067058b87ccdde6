"""The interface a platform's model runner implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kvik.scheduling.kv_cache_groups import KVCacheGroups
from kvik.scheduling.output import RunnerOutput, SchedulerOutput


class StepHandle:
    """A step handed to the device; :meth:`result` waits for its output (once)."""

    __slots__ = ("_finish", "_output")

    def __init__(self, finish: Callable[[], RunnerOutput]) -> None:
        self._finish: Callable[[], RunnerOutput] | None = finish
        self._output: RunnerOutput | None = None

    @classmethod
    def done(cls, output: RunnerOutput) -> StepHandle:
        return cls(lambda: output)

    def result(self) -> RunnerOutput:
        if self._finish is not None:
            self._output, self._finish = self._finish(), None
        assert self._output is not None
        return self._output


class ModelRunner(ABC):
    """Loads a model on one device and executes scheduled steps on it.

    Lifecycle: ``load_model()`` → ``profile()`` → ``initialize_kv_cache(n)``
    → ``execute(...)`` many times → ``shutdown()``.
    """

    # Capabilities (data, checked by the engine at request admission).
    # True when execute() applies ``SchedulerOutput.structured``'s grammar bitmask before sampling.
    supports_structured_output: bool = False
    # True when execute_async() returns before the device finishes and fills a scheduled
    # request's pending token (``ScheduledRequest.num_pending_tokens``) from the samples
    # of the step launched just before: the engine then overlaps its host work with the device.
    supports_async_scheduling: bool = False
    # True when a request scheduled with ``draft_token_ids`` gets the accepted drafts plus one
    # token back, verified exactly (kvik.spec_decode.verify): speculative decoding needs it.
    supports_speculative_decoding: bool = False
    # True when the runner builds the drafter a model-based speculative method names (draft model,
    # EAGLE: kvik.spec_decode.drafter) and returns its proposals in ``RunnerOutput.draft_token_ids``.
    supports_drafters: bool = False
    # True when execute() pools the hidden states of requests with ``pooling_params`` and returns
    # them in ``RunnerOutput.pooled`` (kvik.pooling); the engine refuses runner="pooling" otherwise.
    supports_pooling: bool = False
    # True when execute() runs each scheduled request's ``lora_request`` adapter on its rows (kvik.lora)
    # and the runner implements check_lora / remove_lora; the engine refuses enable_lora otherwise.
    supports_lora: bool = False
    # True when the runner honours ``ResolvedConfig.deterministic`` (batch-invariant kernels:
    # kvik.layers.batch_invariant); the engine refuses deterministic=True otherwise.
    supports_deterministic: bool = False
    # True when a request may start from KV blocks other requests wrote (a prefix-cache hit): the runner
    # reads K/V through the shared paged cache. A runner keeping K/V per request sets False, and the
    # engine then schedules without prefix caching.
    supports_prefix_caching: bool = True

    @abstractmethod
    def load_model(self) -> None:
        """Build the model and load its weights (showing progress)."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes the loaded weights occupy on the device."""

    @abstractmethod
    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block (all layers, K and V) occupies."""

    def kv_cache_groups(self) -> KVCacheGroups | None:
        """How the loaded model's attention layers share KV blocks (:mod:`kvik.scheduling.kv_cache_groups`):
        the scheduler keeps one block table per group and expects each block position's ids interleaved in
        ``ScheduledRequest.new_block_ids``. None (the default): one table for every layer; the engine then
        releases blocks only when every layer slides with one window."""
        return None

    @abstractmethod
    def profile(self) -> int:
        """Run a maximal dummy step; return peak activation bytes beyond weights."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache with ``num_blocks`` blocks per layer."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step: forward the scheduled tokens and sample where asked."""

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launch one step; the handle's ``result()`` gives what :meth:`execute` returns.

        The default runs the step to completion first. Runners that set
        ``supports_async_scheduling`` return once the step is queued on the device;
        steps are executed in launch order, and the next launch may come before
        this one's ``result()``.
        """
        return StepHandle.done(self.execute(scheduler_output))

    def check_lora(self, path: str) -> Any:
        """Check a PEFT adapter against the loaded model (``kvik.lora.adapter.AdapterInfo``); ValueError if bad."""
        raise NotImplementedError(f"{type(self).__name__} does not run LoRA adapters")

    def remove_lora(self, lora_int_id: int) -> None:  # noqa: B027 - only runners with supports_lora use it
        """Drop an unloaded adapter's slot and host copy."""

    def prefetch_lora(self, request: Any) -> None:  # noqa: B027 - optional: loading at first use stays correct
        """A request under ``request`` (a ``kvik.lora.LoRARequest``) was admitted: the runner may start reading
        the adapter's weights now, off the engine's thread, so the step that first runs it only fills a slot.
        Called from any thread."""

    def lora_loading(self, lora_int_id: int) -> bool:
        """True while a prefetch of adapter ``lora_int_id`` is still reading (the scheduler then starts its
        waiting requests in a later step instead of stalling this one on the read). Default: never."""
        return False

    def shutdown(self) -> None:  # noqa: B027 - optional: runners with nothing to release keep the no-op
        """Release device resources."""
