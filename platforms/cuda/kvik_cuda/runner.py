"""The CUDA model runner: the generic torch runner plus pinned step inputs and CUDA graphs.

Decode-only steps (every request adds one token) with at most the largest
captured batch size run *bucketed*: padded with dummy requests to the next
capture size, with the attention backend told to plan for ``max_model_len``.
With CUDA graphs the bucket's graph is replayed; with ``enforce_eager`` the
same padded step runs eagerly. Both launch the same kernels on the same
shapes, so their outputs are identical. Other steps (prefill, mixed) run
eagerly through the base runner.
"""

from __future__ import annotations

import logging
import time

import torch
from kvik.attention.backend import AttentionMetadata
from kvik.config import EngineConfig, ModelConfig
from kvik.engine import progress
from kvik.platforms.interface import Platform
from kvik.plugins.manager import PluginManager
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.torch_runner import TorchModelRunner

from kvik_cuda.inputs import StepInputs

logger = logging.getLogger(__name__)

# backend_data key: an upper bound on any request's length, so a backend can
# plan (e.g. pick a split-KV count) once for every step a graph replays.
SEQ_LEN_BOUND_KEY = "max_seq_len_bound"
GRAPH_MEMORY_RESERVE = 256 << 20  # bytes kept free for graph-private activations (one decode step's worth)


def capture_sizes(max_num_seqs: int, max_tokens: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_num_seqs`` (vLLM's pattern), bounded by the token budget."""
    limit = min(max_num_seqs, max_tokens)
    sizes = [s for s in (1, 2, 4, 8) if s <= limit] + list(range(16, limit + 1, 8))
    if limit not in sizes:
        sizes.append(limit)
    return sizes


class CUDAModelRunner(TorchModelRunner):
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        device: torch.device,
        platform: Platform,
        manager: PluginManager | None = None,
    ) -> None:
        super().__init__(config, model_config, device, platform, manager)
        self.inputs: StepInputs | None = None
        self.sizes: list[int] = []
        # batch size -> (graph, its output hidden states [bs, hidden], the metadata it was
        # captured with: it owns backend scratch buffers the graph writes into)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]] = {}
        self.graph_pool: object | None = None

    # -- setup -----------------------------------------------------------------------------
    def load_model(self) -> None:
        super().load_model()
        self._fuse_layers()
        cfg, mc = self.config, self.model_config
        max_tokens = cfg.max_num_batched_tokens or 8192
        max_reqs = max(cfg.max_num_seqs or 256, max_tokens // max(1, mc.max_model_len) + 1)
        max_blocks = -(-mc.max_model_len // self.block_size) + 1
        self.inputs = StepInputs(max_tokens, max_reqs, max_blocks, self.block_size, self.device)
        self.sizes = capture_sizes(cfg.max_num_seqs or 256, max_tokens)

    def _fuse_layers(self) -> None:
        """Swap RMSNorm / SiLU-and-mul / rotary for one-kernel Triton versions (kvik_cuda.fused).

        On by default on GPUs; ``extra={"fused_layers": False}`` keeps the eager modules
        (``True`` forces them, e.g. on CPU under Triton's interpreter in tests).
        """
        wanted = self.config.extra.get("fused_layers", self.device.type == "cuda")
        if not wanted or self.model is None:
            return
        try:
            from kvik_cuda.fused import fuse_layers
        except ImportError as exc:  # no triton: the eager layers stay
            logger.warning("fused layers unavailable (%s); running the eager ones", exc)
            return
        counts = fuse_layers(self.model)
        logger.info("fused layers: %s", ", ".join(f"{v} x {k}" for k, v in counts.items()) or "none matched")

    @property
    def graphs_enabled(self) -> bool:
        backend = self.attn_backend
        return (
            not self.config.enforce_eager
            and self.device.type == "cuda"
            and backend is not None
            and bool(getattr(backend, "cuda_graph_safe", False))
        )

    def profile(self) -> int:
        """Peak activation bytes of the largest eager step, plus room for the graphs' private pool."""
        peak = super().profile()
        return peak + (GRAPH_MEMORY_RESERVE if self.graphs_enabled else 0)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.graphs = {}
        super().initialize_kv_cache(num_blocks)
        if self.graphs_enabled:
            with progress.step(f"capturing CUDA graphs ({len(self.sizes)} batch sizes)"):
                self.capture_graphs()

    # -- inputs ------------------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        if self.inputs is None or not self.inputs.fits(scheduled):
            return super()._prepare(scheduled)
        step = self.inputs.prepare(scheduled)
        return step.input_ids, step.positions, step.metadata

    def _bucket(self, scheduled: list[ScheduledRequest]) -> int | None:
        """The padded batch size for a decode-only step, or None when the step runs unbucketed."""
        if not self.sizes or not scheduled or self.inputs is None:
            return None
        if not getattr(self.attn_backend, "cuda_graph_safe", False):
            return None  # bucketing only exists to share kernels with the graphs
        if any(len(r.token_ids) != 1 or not r.sample for r in scheduled):
            return None
        n = len(scheduled)
        if n > self.sizes[-1]:
            return None
        size = next(s for s in self.sizes if s >= n)
        return size if self.inputs.fits(scheduled, size) else None

    def _bucketed_metadata(
        self, scheduled: list[ScheduledRequest], size: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        assert self.inputs is not None and self.attn_backend is not None
        step = self.inputs.prepare(scheduled, pad_to=size)
        step.metadata.backend_data[SEQ_LEN_BOUND_KEY] = self.model_config.max_model_len
        self.attn_backend.prepare(step.metadata)
        return step.input_ids, step.positions, step.metadata

    # -- execution ---------------------------------------------------------------------------
    def _forward(self, scheduler_output: SchedulerOutput, rows: str) -> tuple[torch.Tensor, list[int]]:
        scheduled = scheduler_output.scheduled
        if self.inputs is not None:
            self.inputs.release(scheduler_output.finished_request_ids + scheduler_output.preempted_request_ids)
        size = self._bucket(scheduled) if rows == "sample" else None
        if size is None or self.model is None or not self.kv_caches:
            return super()._forward(scheduler_output, rows)
        n = len(scheduled)
        graph = self.graphs.get(size)
        if graph is not None:
            step = self.inputs.prepare(scheduled, pad_to=size)  # type: ignore[union-attr]
            self._fill_pending(step.input_ids, scheduled)
            graph[0].replay()
            hidden = graph[1][:n]
        else:
            input_ids, positions, metadata = self._bucketed_metadata(scheduled, size)
            self._fill_pending(input_ids, scheduled)
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)[:n]
        return self.model.compute_logits(hidden), list(range(n))  # type: ignore[operator]

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one decode graph per batch size, largest first, sharing one memory pool."""
        assert self.model is not None and self.inputs is not None
        start = time.perf_counter()
        self.graph_pool = torch.cuda.graph_pool_handle()
        # One real-looking request at position 0 in the null block; padding fills the rest.
        dummy = [ScheduledRequest("capture", [0], 0, [0], True, SamplingParams())]
        for size in reversed(self.sizes):
            input_ids, positions, metadata = self._bucketed_metadata(dummy, size)
            for _ in range(2):  # compile Triton kernels and settle cuBLAS workspaces outside the capture
                self.model(input_ids, positions, self.kv_caches, metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                out = self.model(input_ids, positions, self.kv_caches, metadata)
            self.graphs[size] = (graph, out, metadata)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d CUDA graphs (decode batch sizes %s) in %.1f s",
            len(self.graphs),
            f"{self.sizes[0]}..{self.sizes[-1]}",
            time.perf_counter() - start,
        )

    def shutdown(self) -> None:
        self.graphs = {}
        self.graph_pool = None
        super().shutdown()
