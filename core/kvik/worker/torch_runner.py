"""The generic model runner for any torch device (cpu, cuda, mps, xpu, ...).

Each step flattens the scheduled requests into one token batch, builds the
attention metadata with three host->device copies, runs the model once and
samples from the last position of every request that asked for a token.

Async scheduling: :meth:`TorchModelRunner.execute_async` returns once the step
is queued; its sampled ids stay on the device, and the next step's pending
tokens (decodes scheduled before this step's samples reached the host) are
gathered from them there. On the CPU the device is the calling thread, so
nothing overlaps: the CPU platform leaves async scheduling off.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.attention.selector import select_attention_backend
from kvik.config import EngineConfig, ModelConfig
from kvik.engine import progress
from kvik.models.formats import ModelFormat
from kvik.models.interface import ModelBuildContext
from kvik.models.loader import dequantize_model, load_model, resolve_format
from kvik.platforms.interface import Platform
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.quantization.base import QuantizationMethod
from kvik.sample.logprobs import prompt_logprob_rows, start_sample_output
from kvik.sample.sampler import Sampler, SamplingBatch
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.tensor_transfer import to_device
from kvik.worker.interface import ModelRunner, StepHandle

logger = logging.getLogger(__name__)


class TorchModelRunner(ModelRunner):
    """Runs a kvik torch model (``CausalLM``) on one ``torch.device``."""

    supports_structured_output = True
    supports_async_scheduling = True

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        device: torch.device,
        platform: Platform,
        manager: PluginManager | None = None,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(device)
        self.platform = platform
        self.manager = manager or get_plugin_manager()
        self.dtype: torch.dtype = getattr(torch, model_config.dtype)
        self.block_size = config.block_size or platform.default_block_size
        self.model: nn.Module | None = None
        self.attn_backend: type[AttentionBackend] | None = None
        self.attn_layers: list[AttentionBackend] = []
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.sampler = Sampler(self.device, config.seed)
        # The last launched step's sampled ids [n] (device) and request id -> row: the
        # source of the next step's pending tokens.
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    # -- loading ----------------------------------------------------------------
    def _format(self) -> ModelFormat:
        if isinstance(self.model_config.source, ModelFormat):
            return self.model_config.source
        if self.config.model is None:
            raise ValueError("no model given: set EngineConfig.model to a checkpoint path")
        return resolve_format(self.config.model, self.manager)

    def _quant_method(self, fmt: ModelFormat) -> tuple[QuantizationMethod | None, str]:
        """The checkpoint's quantization method (or None) and 'quantized' / 'dequantize'."""
        quant = fmt.quantization()
        if quant is None:
            return None, "dense"
        name, qconfig = quant
        method_cls = self.manager.quantization_methods.get(name)
        method: QuantizationMethod = method_cls.from_config(qconfig)
        mode = self.platform.quantized_weights_mode(self.config, name)
        if mode == "quantized":
            allowed = self.platform.quantization_methods
            if allowed is not None and name not in allowed:
                raise ValueError(
                    f"platform {self.platform.name!r} cannot run {name!r} weights packed (it runs: "
                    f"{', '.join(allowed) or 'none'}); use quantized_weights='dequantize'"
                )
            if self.dtype not in method.supported_act_dtypes:
                raise ValueError(
                    f"quantization {name!r} computes in {method.supported_act_dtypes}, not {self.dtype}; "
                    "pick one of those with dtype=..., or quantized_weights='dequantize'"
                )
        return method, mode

    def load_model(self) -> None:
        mc = self.model_config
        self.attn_backend = select_attention_backend(
            self.platform, self.config, mc.head_dim, self.dtype, mc.sliding_window, self.manager
        )
        fmt = self._format()
        method, mode = self._quant_method(fmt)
        backend_cls = self.attn_backend
        self.attn_layers = []

        def make_attention(*args: Any, **kwargs: Any) -> AttentionBackend:
            layer = backend_cls(*args, **kwargs)
            self.attn_layers.append(layer)  # cache i belongs to the i-th attention built
            return layer

        ctx = ModelBuildContext(mc, self.dtype, self.device, make_attention, method)
        with progress.step(f"reading weights ({progress.format_bytes(fmt.weight_bytes())})"):
            model = load_model(mc, ctx, fmt, quantized=method is not None, manager=self.manager)
        if method is not None and mode == "dequantize":
            with progress.step(f"dequantizing {mc.quantization} weights to {mc.dtype}"):
                n = dequantize_model(model, self.dtype)
            logger.info("dequantized %d %s linear layers to %s", n, mc.quantization, mc.dtype)
        self.model = model
        logger.info(
            "loaded %s (%s, %.1f MiB) with attention backend %s",
            mc.architecture,
            mc.dtype,
            self.weight_bytes() / 2**20,
            backend_cls.name,
        )

    def weight_bytes(self) -> int:
        if self.model is None:
            return 0
        seen: dict[int, int] = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- KV cache -----------------------------------------------------------------
    def _cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        backend = self.attn_backend or AttentionBackend
        mc = self.model_config
        return backend.kv_cache_shape(num_blocks, block_size, mc.num_kv_heads, mc.head_dim)

    def kv_block_bytes(self, block_size: int) -> int:
        per_layer = math.prod(self._cache_shape(1, block_size)) * self.dtype.itemsize
        return per_layer * self.model_config.num_layers

    def _allocate(self, num_blocks: int) -> list[torch.Tensor]:
        # Zeroed, not empty: padded block-table entries point at block 0 and are
        # masked, but 0 * NaN from uninitialised memory would still poison a row.
        shape = self._cache_shape(num_blocks, self.block_size)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.attn_layers]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.model is None:
            raise RuntimeError("load_model() must run before initialize_kv_cache()")
        self.kv_caches = []  # free any previous cache before allocating
        self.kv_caches = self._allocate(num_blocks)
        self.num_blocks = num_blocks

    # -- profiling --------------------------------------------------------------------
    def profile(self) -> int:
        """Return the activation bytes of the largest step the scheduler may issue.

        Where the device's torch module keeps allocator statistics (``torch.cuda``,
        ``torch.xpu``, ...) a dummy step of ``max_num_batched_tokens`` tokens runs
        and its peak is measured. Elsewhere (CPU) the bytes are estimated from
        shapes (:meth:`estimate_activation_bytes`) and only a short dummy step runs,
        to prove the model works without spending a full prefill of host compute
        at start-up.
        """
        if self.model is None:
            raise RuntimeError("load_model() must run before profile()")
        num_tokens = self.config.max_num_batched_tokens or 2048
        seq_len = min(num_tokens, self.model_config.max_model_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        stats = getattr(torch, self.device.type, None)
        if not (hasattr(stats, "max_memory_allocated") and hasattr(stats, "reset_peak_memory_stats")):
            self._dummy_step([min(seq_len, 2 * self.block_size), 1])
            return self.estimate_activation_bytes(lens)
        assert stats is not None
        base: list[int] = []

        def start() -> None:  # after the temporary cache exists: measure activations only
            stats.synchronize(self.device)
            stats.reset_peak_memory_stats(self.device)
            base.append(stats.memory_allocated(self.device))

        self._dummy_step(lens, before_step=start)
        stats.synchronize(self.device)
        return max(0, stats.max_memory_allocated(self.device) - base[0])

    def _dummy_step(self, lens: list[int], before_step: Callable[[], None] | None = None) -> None:
        """Execute one step of fresh prompts of ``lens`` tokens on a temporary KV cache."""
        blocks_per_seq = -(-max(lens) // self.block_size)
        saved = self.kv_caches
        self.kv_caches = self._allocate(blocks_per_seq * len(lens) + 1)  # just this step's tokens
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        scheduled = [
            ScheduledRequest(
                f"profile-{i}",
                [0] * n,
                0,
                list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)),
                True,
                params,
            )
            for i, n in enumerate(lens)
        ]
        try:
            if before_step is not None:
                before_step()
            self.execute(SchedulerOutput(scheduled, sum(lens)))
        finally:
            self.kv_caches = saved  # drop the temporary cache

    def estimate_activation_bytes(self, seq_lens: list[int]) -> int:
        """Peak bytes a step over prefills of ``seq_lens`` holds beyond weights and KV cache.

        Per token (model dtype): the residual stream, the normed input and the
        attention output (3 x hidden), q/k/v (heads + 2 kv heads) x head_dim,
        and the MLP's gate_up plus activation (3 x intermediate); only one layer
        is live at a time. Attention adds, per request, a [q, L] score block
        per head in float32 (the math path's worst case) plus its bool mask.
        Sampling holds ~4 float32 [num_reqs, vocab] tensors (logits, probs,
        noise, sort scratch). A 25% margin covers allocator fragmentation.
        """
        mc = self.model_config
        hf = mc.hf_config
        item = self.dtype.itemsize
        inter = int(getattr(hf, "intermediate_size", 4 * mc.hidden_size))
        tokens = sum(seq_lens)
        per_token = 3 * mc.hidden_size + (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim + 3 * inter
        scores = max(n * n * (mc.num_heads * 4 + 1) for n in seq_lens)
        sampling = 4 * len(seq_lens) * mc.vocab_size * 4
        return int(1.25 * (tokens * per_token * item + scores + sampling))

    # -- execution ---------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step into input_ids, positions and attention metadata (3 copies to the device)."""
        bs = self.block_size
        n_reqs = len(scheduled)
        query_lens = [len(r.token_ids) for r in scheduled]
        seq_lens = [r.start_pos + q for r, q in zip(scheduled, query_lens, strict=True)]
        num_tokens = sum(query_lens)
        blocks_needed = [-(-s // bs) for s in seq_lens]
        tables = np.zeros((n_reqs, max(blocks_needed)), dtype=np.int32)
        for i, (r, n_blocks) in enumerate(zip(scheduled, blocks_needed, strict=True)):
            if len(r.block_ids) < n_blocks:
                raise ValueError(
                    f"request {r.request_id!r} has {len(r.block_ids)} blocks for {seq_lens[i]} tokens "
                    f"(block size {bs}); it needs {n_blocks}"
                )
            tables[i, :n_blocks] = r.block_ids[:n_blocks]
        # Per token, vectorised: its request, its position, its cache slot.
        q_arr = np.asarray(query_lens, dtype=np.int64)
        req_of_token = np.repeat(np.arange(n_reqs), q_arr)  # [num_tokens]
        first_row = np.cumsum(q_arr) - q_arr  # [n_reqs] row of each request's first token
        starts = np.asarray([r.start_pos for r in scheduled], dtype=np.int64)
        pos = np.arange(num_tokens, dtype=np.int64) + (starts - first_row)[req_of_token]
        # One int64 buffer holds input_ids | positions | slot_mapping.
        flat = np.empty(3 * num_tokens, dtype=np.int64)
        flat[:num_tokens] = np.fromiter(
            itertools.chain.from_iterable(r.token_ids for r in scheduled), dtype=np.int64, count=num_tokens
        )
        flat[num_tokens : 2 * num_tokens] = pos
        flat[2 * num_tokens :] = tables[req_of_token, pos // bs].astype(np.int64) * bs + pos % bs
        # One int32 buffer holds query_start_loc | seq_lens.
        small = np.concatenate(([0], np.cumsum(query_lens), seq_lens)).astype(np.int32)
        flat_d = to_device(torch.from_numpy(flat), self.device)
        small_d = to_device(torch.from_numpy(small), self.device)
        tables_d = to_device(torch.from_numpy(tables), self.device)
        metadata = AttentionMetadata(
            num_tokens=num_tokens,
            num_reqs=n_reqs,
            query_start_loc=small_d[: n_reqs + 1],
            seq_lens=small_d[n_reqs + 1 :],
            block_tables=tables_d,
            slot_mapping=flat_d[2 * num_tokens :],
            block_size=bs,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return flat_d[:num_tokens], flat_d[num_tokens : 2 * num_tokens], metadata

    def _forward(self, scheduler_output: SchedulerOutput, rows: str) -> tuple[torch.Tensor, list[int]]:
        """Run the step; return float32 logits and which requests they belong to.

        ``rows``: "sample" (last token of each request with ``sample=True``) or
        "all" (every scheduled token, for tests and prompt logprobs).
        """
        if self.model is None:
            raise RuntimeError("load_model() must run before execute()")
        if not self.kv_caches:
            raise RuntimeError("initialize_kv_cache() must run before execute()")
        scheduled = scheduler_output.scheduled
        input_ids, positions, metadata = self._prepare(scheduled)
        self._fill_pending(input_ids, scheduled)
        assert self.attn_backend is not None
        self.attn_backend.prepare(metadata)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)  # [num_tokens, hidden]
        if rows == "all":
            return self.model.compute_logits(hidden), list(range(len(scheduled)))  # type: ignore[operator]
        ends = np.cumsum([len(r.token_ids) for r in scheduled]) - 1
        which = [i for i, r in enumerate(scheduled) if r.sample]
        if not which:
            return hidden.new_empty((0, self.model_config.vocab_size), dtype=torch.float32), []
        index = to_device(torch.from_numpy(ends[which]), self.device)
        return self.model.compute_logits(hidden.index_select(0, index)), which  # type: ignore[operator]

    @torch.inference_mode()
    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False) -> torch.Tensor:
        """Run the step (writing the KV cache) and return float32 logits, without sampling.

        Rows: the last token of each request with ``sample=True``, or every
        scheduled token when ``all_tokens``. For tests and tools.
        """
        logits, _ = self._forward(scheduler_output, "all" if all_tokens else "sample")
        return logits

    def _fill_pending(self, input_ids: torch.Tensor, scheduled: list[ScheduledRequest]) -> None:
        """Write pending tokens (sampled by the previous launch, still on the device) into ``input_ids``."""
        pending = [i for i, r in enumerate(scheduled) if r.num_pending_tokens]
        if not pending:
            return
        missing = [scheduled[i].request_id for i in pending if scheduled[i].request_id not in self._last_rows]
        if missing or self._last_sampled is None:  # _last_rows is empty whenever _last_sampled is None
            raise RuntimeError(f"request {missing[0]!r} has a pending token but the previous step did not sample it")
        if any(scheduled[i].num_pending_tokens != 1 for i in pending):
            raise RuntimeError("a request can wait for at most one token from the previous step")
        ends = np.cumsum([len(r.token_ids) for r in scheduled]) - 1
        src = np.asarray([self._last_rows[scheduled[i].request_id] for i in pending], dtype=np.int64)
        index = to_device(torch.from_numpy(np.stack([ends[pending], src])), self.device)
        input_ids[index[0]] = self._last_sampled[index[1]]

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        if scheduler_output.is_empty:
            return StepHandle.done(RunnerOutput(sampled_token_ids={}))
        scheduled = scheduler_output.scheduled
        prompt_rows = prompt_logprob_rows(scheduled)
        prompt_logits = None
        if prompt_rows:
            # Prompt logprobs need logits at prompt positions: take every token's (rare; prefill only).
            all_logits, _ = self._forward(scheduler_output, "all")  # [num_tokens, vocab]
            which = [i for i, r in enumerate(scheduled) if r.sample]
            ends = np.cumsum([len(r.token_ids) for r in scheduled]) - 1
            logits = all_logits[torch.from_numpy(ends[which]).to(self.device)]
            prompt_logits = all_logits[torch.from_numpy(np.concatenate([p.rows for p in prompt_rows])).to(self.device)]
        else:
            logits, which = self._forward(scheduler_output, "sample")
        if not which and not prompt_rows:
            self._last_sampled, self._last_rows = None, {}
            return StepHandle.done(RunnerOutput(sampled_token_ids={}))
        reqs = [scheduled[i] for i in which]
        batch = SamplingBatch(
            params=[r.sampling_params for r in reqs],
            output_positions=[len(r.output_token_ids) + r.num_pending_outputs for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            eos_token_ids=self.model_config.eos_token_ids,
        )
        structured = scheduler_output.structured
        if structured is not None and structured.request_ids:
            row_of = {r.request_id: i for i, r in enumerate(reqs)}
            batch.bitmask_rows = [row_of[rid] for rid in structured.request_ids]
            batch.bitmask = structured.bitmask
        # Logprobs are of the raw distribution: take them before processors edit the logits in place.
        raw = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in batch.params) else None
        sampled = self.sampler(logits, batch) if reqs else torch.empty(0, dtype=torch.int64, device=self.device)
        self._last_sampled, self._last_rows = sampled, {r.request_id: i for i, r in enumerate(reqs)}
        return StepHandle(start_sample_output(sampled, raw, reqs, prompt_logits, prompt_rows, scheduled))

    def shutdown(self) -> None:
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
