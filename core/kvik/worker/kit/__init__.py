"""The runner kit: what every model runner needs, torch-free (numpy only).

* :class:`BlockTables` - persistent per-request block tables kept from the
  scheduler's block-table deltas (``ScheduledRequest.new_block_ids``);
* :class:`StepLayout` - a step flattened once into numpy arrays (token ids,
  positions, slot mapping, query start locations, sequence lengths,
  block-table rows, logits indices, pending-token rows, prompt-logprob rows),
  optionally written into preallocated :class:`LayoutBuffers`;
* :class:`SamplingBatch` / :func:`sampling_batch`, :class:`PromptRows` /
  :func:`prompt_logprob_rows` - what a sampler needs about the sampled rows;
* :class:`TopLogprobs` / :func:`assemble_output` - host arrays to a ``RunnerOutput``;
* :class:`KitModelRunner` - the step loop, with the hooks ``build_layout``,
  ``prepare_inputs``, ``run_model`` and ``sample`` a platform's runner overrides.

See docs/plugins.md ("Writing a platform") for a runner built on it.
"""

from kvik.sample.batch import PromptRows, SamplingBatch, prompt_logprob_rows, row_seed, sampling_batch
from kvik.worker.kit.block_tables import BlockTables
from kvik.worker.kit.layout import LayoutBuffers, StepLayout
from kvik.worker.kit.logprobs import TopLogprobs, assemble_output
from kvik.worker.kit.runner import KitModelRunner

__all__ = [
    "BlockTables",
    "KitModelRunner",
    "LayoutBuffers",
    "PromptRows",
    "SamplingBatch",
    "StepLayout",
    "TopLogprobs",
    "assemble_output",
    "prompt_logprob_rows",
    "row_seed",
    "sampling_batch",
]
