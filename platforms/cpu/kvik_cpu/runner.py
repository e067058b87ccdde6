"""The CPU model runner: the generic torch runner plus an optional compiled decode step.

At batch 1 a CPU decode step of a small model is mostly host work, not
arithmetic: SmolLM2-135M runs ~4,000 aten calls per token (30 layers of norms,
rotary, projections, attention glue), each a Python frame plus a dispatcher
trip of a few microseconds (docs/benchmarks.md has the profile). With
``platform_options={"compile_decode": True}`` decode-only steps (every request
adds one token) run the model through ``torch.compile`` (inductor's C++/OpenMP
CPU backend), which fuses the elementwise work around the matmuls into a few
generated kernels and drops the per-op Python.

What is compiled, and what is not:

* The paged attention layers stay eager (``torch.compiler.disable`` on each
  instance): their per-step plan (index tensors whose width grows with the
  context) would otherwise recompile the graph as the sequence grows. So
  each decoder layer is two compiled regions around one eager attention call.
* Prefill and mixed steps run the eager model: their token counts change every
  step, and they are dominated by matmuls that compiling does not speed up.
* With ``enable_lora`` or ``deterministic`` nothing is compiled (adapter slots change
  per step; batch-invariant kernels must not be re-fused).

The first decode step of each batch size pays for tracing and code generation
(tens of seconds on a 2-core machine); a dummy decode step at start-up pays it
for batch 1, inside ``kvik: ready in ...``, so a single stream's first token
does not. Inductor caches the generated code on disk (``TORCHINDUCTOR_CACHE_DIR``,
by default under the system temp directory), so later processes start faster.
Outputs are the same as eager up to float rounding of the fused elementwise
kernels; the tests hold greedy tokens identical with the option on and off.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from kvik.engine import progress
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest
from kvik.worker.torch_runner import ModelInputs, TorchModelRunner

from kvik_cpu.packed_linear import pack_linears, packed_bytes
from kvik_cpu.platform import CPUOptions

logger = logging.getLogger(__name__)


class CPUModelRunner(TorchModelRunner):
    """:class:`TorchModelRunner` whose decode-only steps may run a ``torch.compile``-d model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.config.platform_options
        self.compile_decode = isinstance(options, CPUOptions) and options.compile_decode
        self._compiled: Any = None  # the compiled model (callable like self.model), once built
        self.compile_seconds = 0.0  # start-up time spent compiling the batch-1 decode step

    def load_model(self) -> None:
        super().load_model()
        assert self.model is not None
        if not any((self.compile_decode, self.config.enable_lora, self.config.deterministic)):
            # LoRA reads the dense weights; deterministic mode keeps its own batch-invariant matmuls;
            # inductor packs the weights of what it compiles itself.
            packed = pack_linears(self.model)
            if packed:
                logger.debug("%d bfloat16 linear layers run through oneDNN with packed weights", packed)
        if not self.compile_decode:
            return
        # LoRA's adapter slots change per step; deterministic mode's batch-invariant kernels must not
        # be re-fused by inductor (its reductions are chosen per shape).
        clash = "enable_lora" if self.config.enable_lora else "deterministic" if self.config.deterministic else None
        if clash is not None:
            logger.warning("compile_decode is ignored with %s: decode steps run eagerly", clash)
            self.compile_decode = False
            return
        assert self.model is not None
        for layer in self.attn_layers:
            # An instance attribute shadows the class's forward: the model calls attn.forward(...),
            # which dynamo now leaves to eager execution (a graph break around attention).
            layer.forward = torch.compiler.disable(layer.forward)  # type: ignore[method-assign]
        # dynamic=None: the first batch size compiles with static shapes; a second one recompiles
        # with a symbolic batch size, so a growing batch costs at most one more compile.
        self._compiled = torch.compile(self.model, dynamic=None)

    def weight_bytes(self) -> int:
        return super().weight_bytes() + (packed_bytes(self.model) if self.model is not None else 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        super().initialize_kv_cache(num_blocks)
        if self._compiled is not None and self.compile_seconds == 0.0:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the batch-1 decode step now (one dummy request: a 2-token prompt, then 1 decode token)."""
        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=1)
        with progress.step("compiling the decode step (torch.compile, cached on disk)"), torch.inference_mode():
            # Block 0 is the null block; block 1 is scratch here (no request holds blocks yet), in every group.
            self.run_dummy_step([ScheduledRequest("compile-warmup", [0], 1, [1] * self.num_kv_groups, True, params)])
        self.compile_seconds = time.perf_counter() - start
        logger.info("compiled the batch-1 decode step in %.1f s", self.compile_seconds)

    def uses_compiled(self, inputs: ModelInputs) -> bool:
        """A decode-only step (one token per request) with the compiled model built."""
        return self._compiled is not None and inputs.metadata.max_query_len == 1

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        if self.uses_compiled(inputs):
            hidden: torch.Tensor = self._compiled(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)
            return hidden
        return super().run_model(inputs)
