"""The interface a platform's model runner implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvik.scheduling.output import RunnerOutput, SchedulerOutput


class ModelRunner(ABC):
    """Loads a model on one device and executes scheduled steps on it.

    Lifecycle: ``load_model()`` → ``profile()`` → ``initialize_kv_cache(n)``
    → ``execute(...)`` many times → ``shutdown()``.
    """

    # Capabilities (data, checked by the engine at request admission).
    # True when execute() applies ``SchedulerOutput.structured``'s grammar bitmask before sampling.
    supports_structured_output: bool = False

    @abstractmethod
    def load_model(self) -> None:
        """Build the model and load its weights (showing progress)."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes the loaded weights occupy on the device."""

    @abstractmethod
    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block (all layers, K and V) occupies."""

    @abstractmethod
    def profile(self) -> int:
        """Run a maximal dummy step; return peak activation bytes beyond weights."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV cache with ``num_blocks`` blocks per layer."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step: forward the scheduled tokens and sample where asked."""

    def shutdown(self) -> None:  # noqa: B027 - optional: runners with nothing to release keep the no-op
        """Release device resources."""
