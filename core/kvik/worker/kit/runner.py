"""A model runner built on the kit: the step loop written once, with typed hooks for the device work.

:class:`KitModelRunner` implements :meth:`~kvik.worker.interface.ModelRunner.execute_async`
as::

    rows   = self.block_tables.apply(scheduler_output)        # block-table deltas -> persistent rows
    layout = self.build_layout(scheduled, self.block_tables, rows)   # host arrays (numpy)
    inputs = self.prepare_inputs(layout)                       # -> the device's inputs
    hidden = self.run_model(inputs)                            # -> final hidden states [T, hidden]
    handle = self.sample(hidden, layout, structured)          # logits, sampling, logprobs

A platform's runner subclasses it (or a subclass such as
:class:`kvik.worker.torch_runner.TorchModelRunner`) and overrides these hooks:
each is public, documented and typed, so a runner never overrides another
class's private method. Runner-internal steps (profiling, graph capture) go
through :meth:`run_dummy_step`, which uses its own scratch block tables and
leaves the live requests' rows alone.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.worker.interface import ModelRunner, StepHandle
from kvik.worker.kit.block_tables import BlockTables
from kvik.worker.kit.layout import StepLayout

if TYPE_CHECKING:
    from kvik.structured.manager import StructuredStep

InputsT = TypeVar("InputsT")  # what prepare_inputs builds (device arrays + attention metadata)
HiddenT = TypeVar("HiddenT")  # what run_model returns (hidden states on the device)


class KitModelRunner(ModelRunner, Generic[InputsT, HiddenT]):
    """The step loop over the runner kit; subclasses supply the device work through the hooks."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        # One row per live request, updated from each SchedulerOutput's deltas.
        self.block_tables = BlockTables()

    # -- the hooks ---------------------------------------------------------------------
    def build_layout(self, scheduled: list[ScheduledRequest], tables: BlockTables, rows: np.ndarray) -> StepLayout:
        """The step's host arrays. Override to write them into persistent buffers or to pad
        the batch (:meth:`StepLayout.build`'s ``buffers`` / ``pad_to``)."""
        return StepLayout.build(scheduled, tables, rows, self.block_size)

    @abstractmethod
    def prepare_inputs(self, layout: StepLayout) -> InputsT:
        """Move the layout to the device: token ids, positions, the attention metadata.

        Runners with ``supports_async_scheduling`` also fill ``layout.pending_rows``
        with the tokens the previous step sampled, on the device.
        """

    @abstractmethod
    def run_model(self, inputs: InputsT) -> HiddenT:
        """Run the model over the inputs, writing the KV cache; return hidden states, one row per token."""

    @abstractmethod
    def sample(self, hidden: HiddenT, layout: StepLayout, structured: StructuredStep | None) -> StepHandle:
        """Logits at ``layout.logits_indices`` (and prompt-logprob rows), sampled tokens, logprobs.

        Returns a handle whose ``result()`` waits for the host copy and builds the
        :class:`RunnerOutput` (e.g. with :func:`kvik.worker.kit.logprobs.assemble_output`).
        """

    # -- the loop ----------------------------------------------------------------------
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        rows = self.block_tables.apply(scheduler_output)
        if scheduler_output.is_empty:
            return StepHandle.done(RunnerOutput(sampled_token_ids={}))
        layout = self.build_layout(scheduler_output.scheduled, self.block_tables, rows)
        return self.run_layout(layout, scheduler_output.structured)

    def run_layout(self, layout: StepLayout, structured: StructuredStep | None = None) -> StepHandle:
        """prepare_inputs → run_model → sample."""
        return self.sample(self.run_model(self.prepare_inputs(layout)), layout, structured)

    def dummy_layout(self, scheduled: list[ScheduledRequest]) -> StepLayout:
        """The layout of a runner-internal step, over scratch block tables (each request's
        ``new_block_ids`` is its whole table); the live requests' tables are untouched."""
        tables = BlockTables(num_groups=self.block_tables.num_groups)
        rows = tables.apply(SchedulerOutput(scheduled, sum(len(r.token_ids) for r in scheduled)))
        return self.build_layout(scheduled, tables, rows)

    def run_dummy_step(self, scheduled: list[ScheduledRequest]) -> RunnerOutput:
        """Execute a runner-internal step (profiling, warm-up) without disturbing live requests."""
        return self.run_layout(self.dummy_layout(scheduled)).result()
