"""The CUDA model runner: the generic torch runner plus pinned step inputs and CUDA graphs.

It overrides the runner kit's hooks (kvik.worker.kit): ``build_layout`` writes
the step straight into pinned host buffers (padding a step to a captured
shape), ``prepare_inputs`` copies them into persistent device buffers,
``run_model`` replays the shape's graph when there is one.

Steps of two kinds run *bucketed*, padded to a :class:`GraphShape`
``(num_reqs, num_tokens)``:

- decode-only steps (every request adds one token and samples) with at most the
  largest capture size ``s`` of requests, padded with one-token dummy requests to
  the next ``(s, s)``, the attention backend told to plan for ``max_model_len``
  (``AttentionMetadata.max_seq_len_bound``);
- with speculative decoding (``num_speculative_tokens`` = k), *verify-shaped*
  steps: every request samples and adds 1..k+1 tokens (its next token and its
  drafts), at most ``verify_sizes[-1]`` requests. Shape ``(s + 1, s*(k+1) + 1)``:
  the real requests, one-token dummies up to ``s``, then one dummy that absorbs
  every remaining token (``StepLayout.build(pad_tokens_to=...)``), so one graph
  serves every such step of up to ``s`` requests whatever its draft counts. The
  Triton backend reads every per-step value from device tensors and launches a
  grid fixed by (num_tokens, num_reqs), its tile and split count planned from
  ``max_seq_len_bound`` and ``max_query_len_bound`` (k+1), so the graph replays
  correctly over any layout of that shape.

Steps with prompt tokens (prefill, mixed) of up to ``piecewise_sizes[-1]``
tokens are padded to the next of those sizes with an absorber request and run as
piecewise CUDA graphs (:mod:`kvik_cuda.piecewise`): everything but attention
replayed, attention eager on the step's own metadata. An encoder (no KV cache,
nothing to decode) gets these graphs only, cut at its bidirectional attention.

With CUDA graphs the shape's graph is replayed; with ``enforce_eager`` the same
padded step runs eagerly. Both launch the same kernels on the same shapes, so
their outputs are identical. Other steps (larger than every size) run eagerly,
unpadded. Verify shapes exist only with speculation on, for capture sizes up to
:data:`MAX_VERIFY_BATCH` whose tokens fit the step budget and ``max_model_len``,
and not with drafters that need an eager target (EAGLE-3, whose runner captures
nothing). A draft model's own runner gets verify shapes of k+2 tokens per
request from its drafter: its catch-up step replays them, its one-token draft
steps its decode graphs.

LoRA (``enable_lora``): the projections' deltas run as the Triton kernels of
:mod:`kvik_cuda.lora_kernels`, which read each token's adapter slot from the
persistent ``LoRAState.token_slots`` buffer. ``prepare_inputs`` writes that buffer
every step (``-1`` for base-model and padding rows) after putting the step's
adapters in their slots, then has the kernels cut the step's tile map from it
(``LoRAState.prepare_step``) into buffers that also never move, so a graph replays
correctly over any mix of adapters.
Each shape gets two graphs: one without the LoRA kernels (steps with no
adapter) and one with them.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.config import ModelConfig, ResolvedConfig
from kvik.engine import progress
from kvik.layers.batch_invariant import InvariantKernels
from kvik.layers.bidirectional import EncoderAttention
from kvik.layers.moe import MoEExperts
from kvik.lora.compute import add_lora_reference
from kvik.platforms.interface import Platform
from kvik.plugins.manager import PluginManager
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables, StepLayout
from kvik.worker.torch_runner import ModelInputs, TorchModelRunner

from kvik_cuda.inputs import PreparedStep, StepInputs
from kvik_cuda.piecewise import (
    PiecewiseCapture,
    PiecewiseGraph,
    StaticAttentionBuffers,
    default_max_tokens,
    piecewise_sizes,
)
from kvik_cuda.platform import GPUOptions

logger = logging.getLogger(__name__)
_sample = attrgetter("sample")
_token_ids = attrgetter("token_ids")

GRAPH_MEMORY_RESERVE = 256 << 20  # bytes kept free for graph-private activations (one decode step's worth)
# Verify graphs stop at this many requests: speculation pays at small batch (it is turned off under
# load with disable_by_batch_size), while each verify graph costs capture time and pool memory for
# s*(k+1)+1 tokens; past it a verify step's GEMMs dwarf the launch overhead a graph saves.
MAX_VERIFY_BATCH = 64


class GraphShape(NamedTuple):
    """A bucket: the padded step's request and token counts (a decode bucket has them equal)."""

    num_reqs: int
    num_tokens: int


def capture_sizes(max_num_seqs: int, max_tokens: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (vLLM's pattern), bounded by the token budget."""
    limit = min(max_num_seqs, max_tokens)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit] + list(range(16, limit + 1, 8))
    if limit not in sizes:
        sizes.append(limit)
    return sizes


def verify_shapes(sizes: list[int], q: int, max_tokens: int, max_model_len: int) -> list[GraphShape]:
    """The verify buckets ``(s + 1, s*q + 1)`` (``q``: tokens per request, k + 1 for k drafts) for capture
    sizes ``s`` up to :data:`MAX_VERIFY_BATCH` whose tokens fit the step budget and one request's
    length (the absorber's context is its own tokens)."""
    shapes = [GraphShape(s + 1, s * q + 1) for s in sizes if s <= MAX_VERIFY_BATCH]
    return [g for g in shapes if g.num_tokens <= min(max_tokens, max_model_len)]


@dataclass(slots=True)
class CUDAInputs(ModelInputs):
    """Model inputs in the persistent device buffers; ``bucket``: the padded decode or verify step's shape,
    ``piecewise``: the padded prefill or mixed step's token count (at most one is set)."""

    bucket: GraphShape | None = None
    piecewise: int | None = None


_Graph = tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata[torch.Tensor]]
_T = TypeVar("_T")


class CUDAModelRunner(TorchModelRunner):
    def __init__(
        self,
        config: ResolvedConfig,
        model_config: ModelConfig,
        device: torch.device,
        platform: Platform,
        manager: PluginManager | None = None,
    ) -> None:
        super().__init__(config, model_config, device, platform, manager)
        self.inputs: StepInputs | None = None
        self.sizes: list[int] = []  # decode buckets' batch sizes
        self.verify_shapes: list[GraphShape] = []  # verify buckets, by size (empty: no speculation)
        # shape -> (graph, its output hidden states [num_tokens, hidden], the metadata it was
        # captured with: it owns backend scratch buffers the graph writes into)
        self.graphs: dict[GraphShape, _Graph] = {}
        self.lora_graphs: dict[GraphShape, _Graph] = {}
        # the drafter's decode pass per decode size: (graph, its (hidden, logits), its metadata)
        self.draft_graphs: dict[GraphShape, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor], Any]] = {}
        self.draft_prev: torch.Tensor | None = None  # the replayed pass's input states [largest size, hidden]
        self.graph_pool: object | None = None
        self.replays = 0  # graph replays so far (tests, benchmarks)
        self.piecewise_sizes: list[int] = []  # token counts prefill and mixed steps pad to (empty: none do)
        self.piecewise_graphs: dict[int, PiecewiseGraph] = {}
        self.piecewise_replays = 0
        # The layout build_layout last padded to a piecewise size (prepare_inputs reads it in the same step).
        self._piecewise_layout: StepLayout | None = None

    # -- setup -----------------------------------------------------------------------------
    def load_model(self) -> None:
        super().load_model()
        self._fuse_layers()
        self._lora_kernels()
        cfg, mc = self.config, self.model_config
        max_tokens = cfg.max_num_batched_tokens
        # (+1: a verify bucket's absorber request)
        max_reqs = max(cfg.max_num_seqs, max_tokens // max(1, mc.max_model_len) + 1) + 1
        max_blocks = -(-mc.max_model_len // self.block_size) + 1
        self.inputs = StepInputs(max_tokens, max_reqs, max_blocks, self.device, self.num_kv_groups)
        # An encoder never decodes: no decode buckets (its steps pad to the piecewise sizes only).
        self.sizes = capture_sizes(cfg.max_num_seqs, max_tokens) if self.keeps_kv_cache else []
        if self.drafter is not None and self.drafter.needs_eager_target:
            self.verify_tokens_per_request = 0  # no verify graphs: no padding either
        q = self.verify_tokens_per_request
        self.verify_shapes = verify_shapes(self.sizes, q, max_tokens, mc.max_model_len) if q > 1 else []
        self.piecewise_sizes = self._piecewise_sizes()

    def _piecewise_sizes(self) -> list[int]:
        """The token counts prefill and mixed steps pad to, decided whether or not graphs are captured
        (``enforce_eager`` pads the same steps, so both launch the same kernels); empty: none pad.

        None with speculative decoding (EAGLE reads hidden states the model stores on the side), LoRA
        (a step's adapter kernels are switched on and off in Python), deterministic mode, pipeline stages,
        an attention backend that does not replay under graphs (encoders do not use it), or MoE experts left
        on the torch reference (``fused_layers=False``: captured, it runs every expert on every token)."""
        options = self.config.platform_options
        limit = options.piecewise_max_tokens if isinstance(options, GPUOptions) else 0
        budget = self.config.max_num_batched_tokens
        if limit is None:
            limit = default_max_tokens(self.model_config, budget)
        backend = self.attn_backend
        if (
            limit <= 0
            or self.drafter is not None
            or self.lora is not None
            or self.config.deterministic
            or self.parallel.pp_size > 1
            or not self.piece_layers
            or (self.keeps_kv_cache and (backend is None or not backend.supports_cuda_graphs))
            or any(type(m) is MoEExperts for m in self.model.modules())  # type: ignore[union-attr]
        ):
            return []
        return piecewise_sizes(min(limit, budget))

    @property
    def piece_layers(self) -> list[AttentionBackend[torch.Tensor]] | list[EncoderAttention]:
        """The calls piecewise graphs cut the forward at: the paged attention layers, or an encoder's own."""
        if self.keeps_kv_cache:
            return self.attn_layers
        assert self.model is not None
        return [m for m in self.model.modules() if isinstance(m, EncoderAttention)]

    def _fuse_layers(self) -> None:
        """Swap RMSNorm / add + LayerNorm / SiLU-and-mul / rotary / MoE for Triton versions (kvik_cuda.fused).

        The platform option ``fused_layers`` (on by default) turns them off with False;
        tests run them on the CPU under Triton's interpreter.
        """
        options = self.config.platform_options
        if not isinstance(options, GPUOptions) or not options.fused_layers or self.model is None:
            return
        try:
            from kvik_cuda.fused import fuse_layers
        except ImportError as exc:  # no triton: the eager layers stay
            logger.warning("fused layers unavailable (%s); running the eager ones", exc)
            return
        counts = fuse_layers(self.model)
        logger.info("fused layers: %s", ", ".join(f"{v} x {k}" for k, v in counts.items()) or "none matched")

    def batch_invariant_kernels(self) -> InvariantKernels:
        """Deterministic mode: the Triton GEMM for every linear layer and the LM head (kvik_cuda.batch_invariant)."""
        try:
            from kvik_cuda.batch_invariant import cuda_kernels
        except ImportError as exc:
            raise ValueError(
                f"deterministic=True on {self.device.type} needs triton, which failed to import: {exc}"
            ) from exc
        return cuda_kernels()

    def _lora_kernels(self) -> None:
        """LoRA deltas through the Triton kernels (graph-safe); without triton the reference runs, eagerly."""
        if self.lora is None:
            return
        try:
            from kvik_cuda.lora_kernels import TritonLoRA
        except ImportError as exc:
            logger.warning(
                "LoRA Triton kernels unavailable (%s): adapters run the torch reference, no CUDA graphs", exc
            )
            return
        state = self.lora.wrapped.state
        kernels = TritonLoRA(state.token_slots.shape[0], state.token_slots.device)
        state.add_lora, state.prepare_step, state.project = kernels, kernels.prepare_step, kernels.project

    @property
    def graphs_enabled(self) -> bool:
        backend = self.attn_backend
        # The torch reference reads the slots on the host: it cannot be captured.
        lora_ok = self.lora is None or self.lora.wrapped.state.add_lora is not add_lora_reference
        return (
            not self.config.enforce_eager
            and not (self.drafter is not None and self.drafter.needs_eager_target)
            and self.device.type == "cuda"
            and lora_ok
            # An encoder's only graphs are piecewise ones; it never reads the attention backend.
            and (
                (backend is not None and backend.supports_cuda_graphs)
                if self.keeps_kv_cache
                else bool(self.piecewise_sizes)
            )
        )

    def profile(self) -> int:
        """Peak activation bytes of the largest eager step, plus room for the graphs' private pool."""
        peak = super().profile()
        if not self.graphs_enabled:
            return peak
        # The piecewise graphs' pool holds their largest step's activations, beside the eager steps' own.
        piecewise = peak * self.piecewise_sizes[-1] // self.config.max_num_batched_tokens if self.piecewise_sizes else 0
        return peak + GRAPH_MEMORY_RESERVE + piecewise

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.graphs, self.lora_graphs, self.draft_graphs, self.piecewise_graphs = {}, {}, {}, {}
        super().initialize_kv_cache(num_blocks)
        if self.graphs_enabled:
            verify = f", {len(self.verify_shapes)} verify shapes" if self.verify_shapes else ""
            pieces = f", {len(self.piecewise_sizes)} piecewise step sizes" if self.piecewise_sizes else ""
            what = f"{len(self.sizes)} batch sizes{verify}{pieces}" if self.sizes else pieces.removeprefix(", ")
            with progress.step(f"capturing CUDA graphs ({what})"):
                self.capture_graphs()

    # -- the kit's hooks ---------------------------------------------------------------------
    def _bucket(self, scheduled: list[ScheduledRequest]) -> GraphShape | None:
        """The padded shape of a decode-only or verify-shaped step, or None when it runs unbucketed."""
        if not self.sizes or self.attn_backend is None or not self.attn_backend.supports_cuda_graphs:
            return None  # bucketing only exists to share kernels with the graphs
        n = len(scheduled)
        shapes = self.verify_shapes
        largest = max(self.sizes[-1], shapes[-1].num_reqs - 1 if shapes else 0)
        # Every request sampled (map/attrgetter: no Python frame per row).
        if n > largest or not all(map(_sample, scheduled)):
            return None
        lens = list(map(len, map(_token_ids, scheduled)))
        if sum(lens) == n:  # decode-only: one token per request
            if n > self.sizes[-1]:
                return None
            s = next(s for s in self.sizes if s >= n)
            return GraphShape(s, s)
        # Verify-shaped: 1..k+1 tokens each (a next token and its drafts; short prefills fit too).
        if not shapes or n >= shapes[-1].num_reqs or max(lens) > self.verify_tokens_per_request:
            return None
        return next(g for g in shapes if g.num_reqs > n)

    def build_layout(self, scheduled: list[ScheduledRequest], tables: BlockTables, rows: np.ndarray) -> StepLayout:
        """Write the layout into the pinned host buffers (padded to a graph's shape when bucketed).

        A step too large for the buffers gets fresh arrays (and runs through the base runner's copies).
        """
        if self.inputs is None:
            return super().build_layout(scheduled, tables, rows)
        self.inputs.wait_host()  # the previous step's copies have read the buffers
        self._piecewise_layout = None
        shape = self._bucket(scheduled)
        if shape is None and self.piecewise_sizes:
            return self._piecewise_padded(scheduled, tables, rows)
        return self._padded_layout(scheduled, tables, rows, shape)

    def _piecewise_padded(self, scheduled: list[ScheduledRequest], tables: BlockTables, rows: np.ndarray) -> StepLayout:
        """The step padded to the next piecewise size by an absorber request (none when it has that size
        already); unpadded when it is larger than every size or the absorber does not fit the buffers."""
        assert self.inputs is not None
        sizes = self.piecewise_sizes
        num_tokens = sum(map(len, map(_token_ids, scheduled)))
        n = len(scheduled)
        if num_tokens > sizes[-1]:
            return self._padded_layout(scheduled, tables, rows, None)
        size = sizes[bisect_left(sizes, num_tokens)]
        pad_to, pad_tokens_to = (n, None) if size == num_tokens else (n + 1, size)
        layout = StepLayout.build(
            scheduled,
            tables,
            rows,
            self.block_size,
            buffers=self.inputs.host,
            pad_to=pad_to,
            pad_tokens_to=pad_tokens_to,
        )
        if layout.padded_to is not None:
            self._piecewise_layout = layout
        return layout

    def _padded_layout(
        self, scheduled: list[ScheduledRequest], tables: BlockTables, rows: np.ndarray, shape: GraphShape | None
    ) -> StepLayout:
        assert self.inputs is not None
        pad_to = pad_tokens_to = None
        if shape is not None:
            pad_to = shape.num_reqs
            pad_tokens_to = shape.num_tokens if shape.num_tokens != shape.num_reqs else None
        host = self.inputs.host
        return StepLayout.build(
            scheduled, tables, rows, self.block_size, buffers=host, pad_to=pad_to, pad_tokens_to=pad_tokens_to
        )

    def prepare_inputs(self, layout: StepLayout) -> ModelInputs:
        if self.inputs is None or layout.buffers is not self.inputs.host:
            return super().prepare_inputs(layout)
        assert self.attn_backend is not None
        step = self.inputs.copy(layout)
        bucket: GraphShape | None = None
        piecewise: int | None = None
        if self._piecewise_layout is not None and layout is self._piecewise_layout:
            piecewise = self._piecewise_layout.num_tokens  # attention runs eagerly: planned for this step alone
        elif layout.padded_to is not None:
            bucket = GraphShape(layout.num_reqs, layout.num_tokens)
            self._plan_for_every_replay(step.metadata, bucket)
        if bucket not in self.graphs and self.attn_layers:  # a graph replays the plan it was captured with
            self.prepare_attention(step.metadata)
        inputs = CUDAInputs(step.input_ids, step.positions, step.metadata, bucket, piecewise)
        self.fill_pending_tokens(inputs.input_ids, layout)
        self.prepare_lora(layout)
        return inputs

    def run_draft_decode(self, inputs: ModelInputs, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the drafter's decode pass captured for the bucket (``prev`` into its buffer), or run it."""
        bucket = inputs.bucket if isinstance(inputs, CUDAInputs) else None
        graph = self.draft_graphs.get(bucket) if bucket is not None else None
        if graph is None:
            return super().run_draft_decode(inputs, prev)
        assert self.draft_prev is not None
        self.draft_prev[: prev.shape[0]].copy_(prev)
        graph[0].replay()
        self.replays += 1
        return graph[1]

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """Replay the bucket's graph (its output: [bucket, hidden]) or the step's piecewise graphs, or run eagerly."""
        if isinstance(inputs, CUDAInputs) and inputs.piecewise is not None:
            pieces = self.piecewise_graphs.get(inputs.piecewise)
            if pieces is not None:
                self.piecewise_replays += 1
                return pieces.replay(inputs.metadata)
        graphs = self.lora_graphs if self.lora is not None and self.lora.wrapped.state.active else self.graphs
        graph = graphs.get(inputs.bucket) if isinstance(inputs, CUDAInputs) and inputs.bucket is not None else None
        if graph is None:
            return super().run_model(inputs)
        graph[0].replay()
        self.replays += 1
        return graph[1]

    def copy_dummy_decode(self, size: int) -> PreparedStep:
        """Copy a decode batch of ``size`` dummy rows into the device buffers (benchmarks)."""
        return self.copy_dummy_step(GraphShape(size, size))

    def copy_dummy_step(self, shape: GraphShape) -> PreparedStep:
        """Copy a dummy step of ``shape`` into the device buffers (graph capture, benchmarks).

        One real-looking one-token request at position 0 in the null block, padded to the
        shape (a verify shape's absorber takes the extra tokens); its scratch block tables
        leave the live requests' rows alone.
        """
        assert self.inputs is not None
        dummy = [ScheduledRequest("capture", [0], 0, [0] * self.num_kv_groups, True, SamplingParams())]
        scratch = BlockTables(num_groups=self.num_kv_groups)
        rows = scratch.apply(SchedulerOutput(dummy, 1))
        self.inputs.wait_host()
        layout = self._padded_layout(dummy, scratch, rows, shape)
        assert layout.padded_to is not None, f"a {shape} step does not fit the step buffers"
        step = self.inputs.copy(layout)
        self._plan_for_every_replay(step.metadata, shape)
        return step

    def _plan_for_every_replay(self, metadata: AttentionMetadata[torch.Tensor], shape: GraphShape) -> None:
        """Bounds that make the backend's plan (split count, tile) one for every step of ``shape``:
        any context up to max_model_len and, for a verify shape, ``verify_tokens_per_request`` tokens
        per request (its absorber may hold more: that costs it speed, not correctness)."""
        # A drafter's own steps reach up to k positions past the target's context (its drafts).
        lookahead = self.drafter.k if self.drafter is not None else 0
        for group in metadata.all_kv_groups:
            group.max_seq_len_bound = self.model_config.max_model_len + lookahead
            if shape.num_tokens != shape.num_reqs:
                group.max_query_len_bound = self.verify_tokens_per_request

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one graph per decode batch size, largest first, then one per verify shape, all
        sharing one memory pool (with LoRA, a second one per shape that includes the adapter kernels)."""
        assert self.model is not None and self.inputs is not None
        start = time.perf_counter()
        self.graph_pool = torch.cuda.graph_pool_handle()
        state = self.lora.wrapped.state if self.lora is not None else None
        if state is not None:
            state.token_slots.fill_(-1)  # the dummy rows run the base model
        shapes = [GraphShape(s, s) for s in reversed(self.sizes)] + self.verify_shapes[::-1]
        for shape in shapes:
            for with_lora in (False, True) if state is not None else (False,):
                if state is not None:
                    state.active = with_lora
                    if with_lora and state.prepare_step is not None:
                        # The graph reads the step's tile map from the buffers this fills (a replay
                        # finds whatever prepare_lora last wrote there).
                        state.prepare_step(state.token_slots[: shape.num_tokens])
                step = self.copy_dummy_step(shape)
                self.prepare_attention(step.metadata)
                graph, out = self._capture(
                    partial(self.model, step.input_ids, step.positions, self.kv_caches, step.metadata)
                )
                (self.lora_graphs if with_lora else self.graphs)[shape] = (graph, out, step.metadata)
        if state is not None:
            state.active = False
        if self.drafter is not None and self.drafter.has_decode_pass:
            self._capture_draft_decode()
        if self.piecewise_sizes:
            self._capture_piecewise()
        torch.cuda.synchronize(self.device)
        verify = self.verify_shapes
        pieces = self.piecewise_sizes
        logger.info(
            "captured %d CUDA graphs (decode batch sizes %s%s%s) in %.1f s",
            len(self.graphs),
            f"{self.sizes[0]}..{self.sizes[-1]}" if self.sizes else "none",
            f"; verify (requests, tokens) {tuple(verify[0])}..{tuple(verify[-1])}" if verify else "",
            f"; piecewise steps of {pieces[0]}..{pieces[-1]} tokens" if self.piecewise_graphs else "",
            time.perf_counter() - start,
        )

    def _capture_piecewise(self) -> None:
        """One :class:`PiecewiseGraph` per piecewise size, largest first, in the shared pool. A model whose
        forward cannot be captured (a host sync between two attention calls) keeps its steps eager, padded."""
        assert self.model is not None and self.attn_backend is not None
        buffers = StaticAttentionBuffers(self.piecewise_sizes[-1])
        layers = self.piece_layers
        stream = torch.cuda.Stream(self.device)
        try:
            for size in reversed(self.piecewise_sizes):
                step = self._piecewise_dummy(size)
                if self.attn_layers:
                    self.prepare_attention(step.metadata)
                run = partial(self.model, step.input_ids, step.positions, self.kv_caches, step.metadata)
                run()  # Triton compiles, cuBLAS settles: nothing of that may happen inside a capture
                torch.cuda.synchronize(self.device)
                with torch.cuda.stream(stream):
                    graph = PiecewiseCapture(layers, buffers, torch.cuda.CUDAGraph, self.graph_pool).run(run)
                stream.synchronize()
                self.piecewise_graphs[size] = graph
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            self.piecewise_graphs = {}
            logger.warning("piecewise CUDA graphs failed to capture (%s): prefill and mixed steps run eagerly", exc)

    def _piecewise_dummy(self, size: int) -> PreparedStep:
        """A dummy prefill step of ``size`` tokens in the device buffers: prompts as long as a request may be,
        every token in the null block (what the capture's own attention calls read and write)."""
        assert self.inputs is not None
        longest = min(self.model_config.max_model_len, (self.inputs.max_blocks - 1) * self.block_size)
        lens = [longest] * (size // longest) + ([size % longest] if size % longest else [])
        bs, groups = self.block_size, self.num_kv_groups
        dummy = [
            ScheduledRequest(f"piecewise-{i}", [0] * n, 0, [0] * (-(-n // bs) * groups), True, SamplingParams())
            for i, n in enumerate(lens)
        ]
        layout = self.dummy_layout(dummy)  # a size of the ladder: no absorber
        assert layout.buffers is self.inputs.host, f"a {size}-token step does not fit the step buffers"
        return self.inputs.copy(layout)

    def _capture_draft_decode(self) -> None:
        """One graph per decode size of the drafter's one-token pass (EAGLE's head and its logits), in
        the target's pool: the draft steps of a speculative step otherwise run eagerly, kernel by kernel."""
        drafter = self.drafter
        assert drafter is not None and self.model_config is not None
        hidden = self.model_config.hidden_size
        self.draft_prev = torch.zeros(self.sizes[-1], hidden, dtype=self.dtype, device=self.device)
        for size in reversed(self.sizes):
            shape = GraphShape(size, size)
            step = self.copy_dummy_step(shape)
            self.prepare_attention(step.metadata)
            graph, out = self._capture(
                partial(drafter.decode_pass, step.input_ids, self.draft_prev[:size], step.positions, step.metadata)
            )
            self.draft_graphs[shape] = (graph, out, step.metadata)

    def _capture(self, run: Callable[[], _T]) -> tuple[torch.cuda.CUDAGraph, _T]:
        """Run ``run`` twice (Triton compiles, cuBLAS workspaces settle outside the capture), then capture
        it in the shared pool; return the graph and the output tensors its replays rewrite."""
        for _ in range(2):
            run()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            out = run()
        return graph, out

    def shutdown(self) -> None:
        self.graphs, self.lora_graphs, self.draft_graphs, self.piecewise_graphs = {}, {}, {}, {}
        self.graph_pool = None
        super().shutdown()
