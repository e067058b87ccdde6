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

import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kvik.attention import fp8_kv
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.config import LoadFormat, ModelConfig, ResolvedConfig, WeightsMode
from kvik.distributed.parallel_state import get_parallel_state
from kvik.distributed.sharding import kv_heads_per_rank
from kvik.engine import progress
from kvik.layers.batch_invariant import InvariantKernels, make_batch_invariant, torch_kernels
from kvik.layers.batch_invariant import describe as describe_counts
from kvik.lora.adapter import AdapterInfo
from kvik.lora.layers import wrap_model
from kvik.lora.slots import LoRASlots
from kvik.models.formats import ModelFormat
from kvik.models.interface import ModelBuildContext
from kvik.models.loader import dequantize_model, load_model
from kvik.models.model_config import resolve_format
from kvik.platforms.interface import Platform
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.pooling.pooler import StepPooler
from kvik.quantization.base import QuantizationMethod
from kvik.sample.batch import sampling_batch
from kvik.sample.logprobs import start_sample_output
from kvik.sample.sampler import Sampler
from kvik.sampling_params import SamplingParams
from kvik.scheduling.kv_cache_groups import KVCacheGroups, plan_kv_cache_groups, shared_window
from kvik.scheduling.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from kvik.spec_decode.drafter import Drafter, make_drafter
from kvik.spec_decode.verify import sample_verify, verify_rows
from kvik.tensor_transfer import start_to_host, to_device
from kvik.worker.interface import StepHandle
from kvik.worker.kit import BlockTables, KitModelRunner, StepLayout

if TYPE_CHECKING:
    from kvik.structured.manager import StructuredStep

logger = logging.getLogger(__name__)
_request_id = attrgetter("request_id")
_draft_token_ids = attrgetter("draft_token_ids")


@dataclass(slots=True)
class ModelInputs:
    """One step's model inputs on the device (what :meth:`TorchModelRunner.prepare_inputs` builds)."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata[torch.Tensor]


class TorchModelRunner(KitModelRunner[ModelInputs, torch.Tensor]):
    """Runs a kvik torch model (``CausalLM``) on one ``torch.device``.

    Built on the runner kit (:mod:`kvik.worker.kit`): subclasses override its hooks
    (``build_layout``, ``prepare_inputs``, ``run_model``, ``sample``) and may call
    :meth:`fill_pending_tokens` from their own ``prepare_inputs``.
    """

    supports_structured_output = True
    supports_async_scheduling = True
    supports_speculative_decoding = True
    supports_drafters = True
    supports_pooling = True
    supports_lora = True
    supports_deterministic = True

    def __init__(
        self,
        config: ResolvedConfig,
        model_config: ModelConfig,
        device: torch.device,
        platform: Platform,
        manager: PluginManager | None = None,
    ) -> None:
        super().__init__(config.block_size)
        self.config = config
        self.model_config = model_config
        self.device = torch.device(device)
        self.platform = platform
        self.manager = manager or get_plugin_manager()
        self.dtype: torch.dtype = getattr(torch, model_config.dtype)
        # What the paged KV cache holds: the model dtype, or float8 e4m3 (kv_cache_dtype="fp8").
        self.kv_cache_dtype: torch.dtype = fp8_kv.cache_dtype(config.kv_cache_dtype, self.dtype)
        self.model: nn.Module | None = None
        self.attn_backend: type[AttentionBackend[torch.Tensor]] | None = None
        self.attn_layers: list[AttentionBackend[torch.Tensor]] = []
        self.kv_caches: list[torch.Tensor] = []  # one per attention layer (layers of a group's slot share one)
        self.num_blocks = 0
        self.kv_groups: KVCacheGroups | None = None  # planned at the end of load_model()
        self.sampler = Sampler(self.device, config.seed, batch_invariant=config.deterministic)
        # The last launched step's sampled ids [n] (device) and the requests they belong to, in
        # order: the source of the next step's pending tokens.
        self._last_sampled: torch.Tensor | None = None
        self._last_ids: list[str] = []
        self.pooler = StepPooler()  # pooling requests' reductions (kvik.pooling); its head comes with the model
        self.drafter: Drafter | None = None  # a model-based proposer (draft model, EAGLE head), if configured
        # The most tokens a request adds in the steady speculative steps whose requests all sample
        # (a verify step: the next token and k drafts; a draft model's catch-up: k + 2), 0 without
        # speculation. A runner may specialise for such steps (the CUDA runner's verify graphs).
        spec = config.speculative_config
        self.verify_tokens_per_request = spec.num_speculative_tokens + 1 if spec is not None else 0
        self.lora: LoRASlots | None = None  # enable_lora: the adapter slots (kvik.lora)
        # This process's slice of a tensor/pipeline-parallel model (set by the executor's worker;
        # a single device otherwise): the model is built from it, the KV cache holds its heads.
        self.parallel = get_parallel_state()

    # -- loading ----------------------------------------------------------------
    def _format(self) -> ModelFormat:
        if isinstance(self.model_config.source, ModelFormat):
            return self.model_config.source
        return resolve_format(self.config.model, self.manager, trust_remote_code=self.config.trust_remote_code)

    def _quant_method(self, fmt: ModelFormat) -> QuantizationMethod | None:
        """The model's quantization method (the checkpoint's, or one quantizing dense weights at load), or None.

        Checked here, at start-up and before any weight is read: a method that
        cannot run packed on this device is refused with its own reasons.
        """
        name = self.model_config.quantization
        if name is None:
            return None
        quant = fmt.quantization()
        qconfig = quant[1] if quant is not None else {}
        method_cls = self.manager.quantization_methods.get(name)
        method: QuantizationMethod = method_cls.from_config(qconfig)
        if self.config.quantized_weights is WeightsMode.QUANTIZED:
            allowed = self.platform.quantization_methods
            if allowed is not None and name not in allowed:
                raise ValueError(
                    f"platform {self.platform.name!r} cannot run {name!r} weights packed (it runs: "
                    f"{', '.join(allowed) or 'none'}); use quantized_weights='dequantize'"
                )
            reasons = method.validate_device(self.device)
            if reasons:
                raise ValueError("; ".join(reasons))
            if self.dtype not in method.supported_act_dtypes:
                raise ValueError(
                    f"quantization {name!r} computes in {method.supported_act_dtypes}, not {self.dtype}; "
                    "pick one of those with dtype=..., or quantized_weights='dequantize'"
                )
        return method

    def load_model(self) -> None:
        mc = self.model_config
        self.attn_backend = self.manager.attention_backends.get(self.config.attention_backend)
        fmt = self._format()
        method = self._quant_method(fmt)
        backend_cls = self.attn_backend
        self.attn_layers = []

        def make_attention(*args: Any, **kwargs: Any) -> AttentionBackend[torch.Tensor]:
            if self.config.deterministic:  # only asked for when on: backends that predate it keep working
                kwargs["batch_invariant"] = True
            layer = backend_cls(*args, **kwargs)
            self.attn_layers.append(layer)  # cache i belongs to the i-th attention built
            return layer

        ctx = ModelBuildContext(mc, self.dtype, self.device, make_attention, method, self.parallel)
        dummy = self.config.seed if self.config.load_format is LoadFormat.DUMMY else None
        what = "making dummy weights" if dummy is not None else f"reading weights ({progress.format_bytes(fmt.weight_bytes())})"
        with progress.step(what):
            quantized_checkpoint = method is not None and fmt.quantization() is not None
            model = load_model(mc, ctx, fmt, quantized=quantized_checkpoint, manager=self.manager, dummy_seed=dummy)
        if method is not None and not quantized_checkpoint:
            # Quantizing at load freed the dense weights: give the allocator's cached blocks back,
            # so the memory planner (which asks the driver what is free) counts them for the KV cache.
            allocator = getattr(torch, self.device.type, None)
            if callable(getattr(allocator, "empty_cache", None)):
                allocator.empty_cache()  # type: ignore[union-attr]
        if method is not None and self.config.quantized_weights is WeightsMode.DEQUANTIZE:
            with progress.step(f"dequantizing {mc.quantization} weights to {mc.dtype}"):
                n = dequantize_model(model, self.dtype)
            logger.info("dequantized %d %s linear layers to %s", n, mc.quantization, mc.dtype)
        self.model = model
        if self.config.calculate_kv_scales:
            self._calculate_kv_scales()
        self._note_kv_scales()
        if self.config.deterministic:
            counts = make_batch_invariant(model, self.batch_invariant_kernels())
            logger.info("deterministic mode: batch-invariant %s", describe_counts(counts))
        if self.config.enable_lora:
            self._wrap_lora(model)
        self.pooler = StepPooler(getattr(model, "pooler_head", None))
        self.drafter = make_drafter(self)
        if self.drafter is not None:
            with progress.step(f"loading the {self.config.speculative_config.method} drafter"):  # type: ignore[union-attr]
                self.drafter.load()
        self._plan_kv_groups()
        logger.info(
            "loaded %s (%s, %.1f MiB) with attention backend %s",
            mc.architecture,
            mc.dtype,
            self.weight_bytes() / 2**20,
            backend_cls.name,
        )

    def _plan_kv_groups(self) -> None:
        """Split the attention layers into KV-cache groups by window (kvik.scheduling.kv_cache_groups) where
        this runner can: its backend reads a layer's group's table, the built layers are the model's (no
        pipeline stage holding a slice), and no drafter reads the same tables."""
        windows = tuple(layer.sliding_window for layer in self.attn_layers)
        if not windows:
            self.kv_groups = None
            return
        backend = self.attn_backend
        if self.drafter is not None:  # the draft layers read the target's tables: every block stays
            self.kv_groups = KVCacheGroups.single(len(windows))
        elif len(windows) != self.model_config.num_layers:  # a pipeline stage's slice: as every rank plans
            window = shared_window(self.model_config.layer_sliding_windows)
            self.kv_groups = KVCacheGroups.single(len(windows), window)
        else:  # the built layers' own windows (the fallback's come from transformers' modules)
            self.kv_groups = plan_kv_cache_groups(
                windows,
                split=backend is not None and backend.supports_kv_cache_groups,
                max_model_len=self.model_config.max_model_len,
                block_size=self.block_size,
                step_tokens=self.config.max_num_batched_tokens,
            )
        for layer, group in zip(self.attn_layers, self.kv_groups.layer_group, strict=True):
            layer.kv_cache_group = group
        self.block_tables = BlockTables(num_groups=self.kv_groups.num_groups)
        if self.kv_groups.num_groups > 1:
            logger.info(
                "KV cache in %d groups of %d layers (windows %s): blocks a window has passed are released",
                self.kv_groups.num_groups,
                self.kv_groups.num_tensors,
                ", ".join("full" if w is None else str(w) for w in self.kv_groups.windows),
            )

    def kv_cache_groups(self) -> KVCacheGroups | None:
        return self.kv_groups

    def _calculate_kv_scales(self, num_tokens: int = 512) -> None:
        """``calculate_kv_scales``: each FP8 layer the checkpoint gave no scales gets them from the K and V
        it sees on one calibration prefill of ``num_tokens`` seeded random tokens (fp8_kv.scale_from_amax).

        At start-up, before any CUDA graph bakes the scales in; a rank of a tensor-parallel model
        measures its own heads, which is what its cache holds.
        """
        todo = [i for i, layer in enumerate(self.attn_layers) if not layer.kv_scales_from_checkpoint]
        if self.kv_cache_dtype != fp8_kv.FP8_DTYPE or not todo:
            return
        n = min(num_tokens, self.model_config.max_model_len, self.config.max_num_batched_tokens)
        generator = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(0, self.model_config.vocab_size, (n,), generator=generator).tolist()
        step = progress.step(f"measuring FP8 KV-cache scales on a {n}-token calibration prefill")
        with step, fp8_kv.observed_kv_amax(self.attn_layers, todo) as amax:
            self._dummy_step([n], token_ids=[ids])
        for i in todo:
            layer = self.attn_layers[i]
            layer.k_scale = fp8_kv.scale_from_amax(float(amax[i, 0]))
            layer.v_scale = fp8_kv.scale_from_amax(float(amax[i, 1]))

    def _note_kv_scales(self) -> None:
        """With an FP8 cache, say where each layer's K/V scales come from (once, at load)."""
        layers = self.attn_layers
        if self.kv_cache_dtype != fp8_kv.FP8_DTYPE or not layers:
            return
        given = sum(layer.kv_scales_from_checkpoint for layer in layers)
        if given < len(layers) and not self.config.calculate_kv_scales:
            logger.info(
                "kv_cache_dtype=fp8_e4m3: the checkpoint has no k_scale/v_scale for %d of %d attention layers; "
                "those use scale 1.0 (K/V values beyond +-448 saturate, tiny ones lose precision). "
                "calculate_kv_scales=True measures them at start-up; a checkpoint calibrated with a "
                "kv_cache_scheme (llm-compressor) carries per-layer scales", len(layers) - given, len(layers),
            )  # fmt: skip
            return
        sources = [f"{given} layers from the checkpoint"] if given else []
        if given < len(layers):  # the rest were measured (_calculate_kv_scales)
            sources.append(f"{len(layers) - given} layers measured at start-up")
        k = [layer.k_scale for layer in layers]
        v = [layer.v_scale for layer in layers]
        logger.info(
            "kv_cache_dtype=fp8_e4m3: k_scale/v_scale of %s (k %.4g..%.4g, v %.4g..%.4g)",
            " and of ".join(sources), min(k), max(k), min(v), max(v),
        )  # fmt: skip

    def batch_invariant_kernels(self) -> InvariantKernels:
        """The kernels deterministic mode runs (kvik.layers.batch_invariant); device runners override."""
        return torch_kernels()

    # -- LoRA ---------------------------------------------------------------------------
    def _wrap_lora(self, model: nn.Module) -> None:
        """Give the projections ``max_loras`` adapter slots (kvik.lora.layers); their bytes count as weights."""
        cfg = self.config
        max_tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        wrapped = wrap_model(model, cfg.max_loras, cfg.max_lora_rank, max_tokens)
        self.lora = LoRASlots(wrapped, cfg.max_loras, cfg.max_cpu_loras, cfg.max_lora_rank)
        logger.info(
            "LoRA: %d projections with %d slots of rank %d", len(wrapped.layers), cfg.max_loras, cfg.max_lora_rank
        )

    def check_lora(self, path: str) -> AdapterInfo:
        if self.lora is None:
            raise RuntimeError("the model is not loaded with enable_lora")
        return self.lora.check(path)

    def remove_lora(self, lora_int_id: int) -> None:
        if self.lora is not None:
            self.lora.remove(lora_int_id)

    def prefetch_lora(self, request: Any) -> None:
        if self.lora is not None:
            self.lora.prefetch(request)

    def lora_loading(self, lora_int_id: int) -> bool:
        return self.lora is not None and self.lora.loading(lora_int_id)

    def prepare_lora(self, layout: StepLayout) -> None:
        """Put the step's adapters in slots and each token row's slot in the model's ``token_slots`` buffer.

        Padding rows and base-model rows get -1. The buffer is written every step (a
        replayed CUDA graph reads it whether or not the step has adapters).
        """
        if self.lora is None:
            return
        state = self.lora.wrapped.state
        slots = self.lora.token_slots(layout.scheduled, layout.num_tokens)
        state.active = slots is not None
        if slots is None:
            state.token_slots[: layout.num_tokens].fill_(-1)
        else:
            state.token_slots[: layout.num_tokens].copy_(to_device(torch.from_numpy(slots), self.device))
            if state.prepare_step is not None:
                state.prepare_step(state.token_slots[: layout.num_tokens])

    def weight_bytes(self) -> int:
        if self.model is None:
            return 0
        seen: dict[int, int] = {}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if not t.is_meta:  # shape only: an embedding served from the packed tied head
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values()) + (self.drafter.weight_bytes() if self.drafter is not None else 0)

    # -- KV cache -----------------------------------------------------------------
    def _cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        backend = self.attn_backend or AttentionBackend
        mc = self.model_config
        kv_heads = kv_heads_per_rank(mc.num_kv_heads, self.parallel.tp_size)  # this rank's heads
        return backend.kv_cache_shape(num_blocks, block_size, kv_heads, mc.head_dim)

    @property
    def keeps_kv_cache(self) -> bool:
        """False for a loaded model that built no paged attention (a bidirectional encoder)."""
        return self.model is None or bool(self.attn_layers)

    def kv_block_bytes(self, block_size: int) -> int:
        if not self.keeps_kv_cache:
            # Blocks are the scheduler's bookkeeping only: nothing is allocated for them. One byte keeps
            # the memory planner's arithmetic; its pool is capped at what max_num_seqs requests can use.
            return 1
        per_layer = math.prod(self._cache_shape(1, block_size)) * self.kv_cache_dtype.itemsize
        drafter = self.drafter.kv_block_bytes(block_size) if self.drafter is not None else 0
        # A pipeline stage caches its own layers: one cache per attention layer it built, or with KV-cache
        # groups one per slot of a group (a block id is a page in each).
        if self.model is None:
            tensors = self.model_config.num_layers
        else:
            tensors = self.kv_groups.num_tensors if self.kv_groups is not None else len(self.attn_layers)
        return per_layer * tensors + drafter

    def _allocate(self, num_blocks: int) -> list[torch.Tensor]:
        """One cache tensor per attention layer; with KV-cache groups the j-th layer of every group gets
        the same tensor (the groups' block ids never overlap)."""
        # Zeroed, not empty: padded block-table entries point at block 0 and are
        # masked, but 0 * NaN from uninitialised memory would still poison a row.
        shape = self._cache_shape(num_blocks, self.block_size)
        if self.kv_groups is None:
            return [_zeros(shape, self.kv_cache_dtype, self.device) for _ in self.attn_layers]
        tensors = [_zeros(shape, self.kv_cache_dtype, self.device) for _ in range(self.kv_groups.num_tensors)]
        return [tensors[t] for t in self.kv_groups.layer_tensor]

    @property
    def num_kv_groups(self) -> int:
        """Block ids per block position in this runner's tables (kvik.scheduling.kv_cache_groups)."""
        return self.block_tables.num_groups

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if self.model is None:
            raise RuntimeError("load_model() must run before initialize_kv_cache()")
        self.kv_caches = []  # free any previous cache before allocating
        self.kv_caches = self._allocate(num_blocks)
        self.num_blocks = num_blocks
        if self.drafter is not None:
            self.drafter.initialize_kv_cache(num_blocks)  # draft layers' blocks, same ids

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
        num_tokens = self.config.max_num_batched_tokens
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

    def _dummy_step(
        self, lens: list[int], before_step: Callable[[], None] | None = None, token_ids: list[list[int]] | None = None
    ) -> None:
        """Execute one step of fresh prompts of ``lens`` tokens (``token_ids``, else zeros) on a temporary KV cache."""
        blocks_per_seq = -(-max(lens) // self.block_size) * self.num_kv_groups  # every group's, interleaved
        saved = self.kv_caches
        self.kv_caches = self._allocate(blocks_per_seq * len(lens) + 1)  # just this step's tokens
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        scheduled = [
            ScheduledRequest(
                f"profile-{i}",
                token_ids[i] if token_ids is not None else [0] * n,
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
            with torch.inference_mode():
                self.run_dummy_step(scheduled)
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

    # -- execution (the kit's hooks) -------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.execute_async(scheduler_output).result()

    @torch.inference_mode()
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        self._check_ready()
        self._forget_pools(scheduler_output)
        return super().execute_async(scheduler_output)

    def _check_ready(self) -> None:
        if self.model is None:
            raise RuntimeError("load_model() must run before execute()")
        if not self.kv_caches and self.keeps_kv_cache:
            raise RuntimeError("initialize_kv_cache() must run before execute()")

    def prepare_inputs(self, layout: StepLayout) -> ModelInputs:
        """Three host->device copies (token ids | positions | slots, query starts | seq lens, tables),
        the backend's per-step plan, and the pending tokens filled on the device."""
        n, t = layout.num_reqs, layout.num_tokens
        flat = np.concatenate([layout.token_ids, layout.positions, layout.slot_mappings.reshape(-1)])
        small = np.concatenate([layout.query_start_loc, layout.seq_lens])
        flat_d = to_device(torch.from_numpy(flat), self.device)
        small_d = to_device(torch.from_numpy(small), self.device)
        tables_d = to_device(torch.from_numpy(layout.block_tables), self.device)  # [G, R, cols]
        slots_d = flat_d[2 * t :].view(-1, t)  # [G, T]
        metadata = AttentionMetadata(
            num_tokens=t,
            num_reqs=n,
            query_start_loc=small_d[: n + 1],
            seq_lens=small_d[n + 1 :],
            block_tables=tables_d[0],
            slot_mapping=slots_d[0],
            block_size=layout.block_size,
            max_query_len=layout.max_query_len,
            max_seq_len=layout.max_seq_len,
            query_lens_cpu=layout.query_lens_cpu,
            seq_lens_cpu=layout.seq_lens_cpu,
            num_padding_reqs=layout.num_reqs - len(layout.scheduled),
        )
        if tables_d.shape[0] > 1:
            metadata.add_kv_groups(tables_d[1:].unbind(), slots_d[1:].unbind())
        self.prepare_attention(metadata)
        inputs = ModelInputs(flat_d[:t], flat_d[t : 2 * t], metadata)
        self.fill_pending_tokens(inputs.input_ids, layout)
        self.prepare_lora(layout)
        return inputs

    def prepare_attention(self, metadata: AttentionMetadata[torch.Tensor]) -> None:
        """The backend's per-step plan, for each KV-cache group's metadata."""
        assert self.attn_backend is not None
        for group in metadata.all_kv_groups:
            self.attn_backend.prepare(group)

    def fill_pending_tokens(self, input_ids: torch.Tensor, layout: StepLayout) -> None:
        """Write the tokens the previous launch sampled (still on the device) at ``layout.pending_rows``."""
        pending = layout.pending_request_ids
        if not pending:
            return
        last = self._last_sampled
        rows = layout.pending_rows
        p = len(pending)
        if last is not None and pending == self._last_ids[:p] and int(rows[-1]) == p - 1:
            # The steady decode state: the first p rows wait for the last step's first p samples,
            # in order (pending rows ascend from 0 and are distinct, so they are 0..p-1). One
            # device-side copy, no index upload.
            input_ids[:p].copy_(last[:p])
            return
        last_rows = {rid: i for i, rid in enumerate(self._last_ids)}
        missing = [rid for rid in pending if rid not in last_rows]
        if missing or last is None:  # _last_ids is empty whenever _last_sampled is None
            raise RuntimeError(f"request {missing[0]!r} has a pending token but the previous step did not sample it")
        src = np.fromiter(map(last_rows.__getitem__, pending), dtype=np.int64)
        index = to_device(torch.from_numpy(np.stack([rows, src])), self.device)
        input_ids[index[0]] = last[index[1]]

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """The model's final hidden states, [num_tokens, hidden]."""
        assert self.model is not None
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)

    def run_draft_decode(self, inputs: ModelInputs, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafter's :meth:`~kvik.spec_decode.drafter.Drafter.decode_pass` over ``inputs`` (every row,
        padding included; ``prev`` has a row for each). Runners with CUDA graphs replay a captured one."""
        assert self.drafter is not None
        return self.drafter.decode_pass(inputs.input_ids, prev, inputs.positions, inputs.metadata)

    def _logits(self, hidden: torch.Tensor, layout: StepLayout, rows: np.ndarray) -> torch.Tensor:
        """float32 logits [len(rows), vocab] at token ``rows`` of ``hidden``."""
        assert self.model is not None
        if rows.shape[0] == layout.num_scheduled_tokens:  # every real row (padding sits after them)
            return self.model.compute_logits(hidden[: rows.shape[0]])  # type: ignore[operator]
        index = to_device(torch.from_numpy(rows), self.device)
        return self.model.compute_logits(hidden.index_select(0, index))  # type: ignore[operator]

    def sample(self, hidden: torch.Tensor, layout: StepLayout, structured: StructuredStep | None) -> StepHandle:
        """Pool the pooling requests' rows, sample the rows that ask; start the device->host copies."""
        if not self.parallel.is_last_stage:  # an earlier pipeline stage: its output went to the next stage
            return StepHandle.done(RunnerOutput(sampled_token_ids={}))
        handle = self._sample(hidden, layout, structured)
        if self.drafter is not None:
            handle = self._with_drafts(handle, hidden, layout)
        pooled_ids, pooled = self.pooler.pool(hidden, layout.scheduled, layout.query_start_loc)
        if pooled is None:
            return handle

        # Copied now, behind its own event: a copy started when the engine asks for the results would queue
        # behind the next step, launched by then (async scheduling), and wait for all of it.
        copied = start_to_host(pooled)

        def finish() -> RunnerOutput:
            out = handle.result()
            out.pooled = dict(zip(pooled_ids, copied().numpy(), strict=True))  # rows of one array
            return out

        return StepHandle(finish)

    def _with_drafts(self, handle: StepHandle, hidden: torch.Tensor, layout: StepLayout) -> StepHandle:
        """Once the step's tokens are known, the drafter proposes the next step's drafts (speculative
        steps are synchronous: the engine asks for this result before it launches the next step)."""
        drafter = self.drafter
        assert drafter is not None

        def finish() -> RunnerOutput:
            out = handle.result()
            out.draft_token_ids = drafter.propose(layout, hidden, out.sampled_token_ids)
            return out

        return StepHandle(finish)

    def _sample(self, hidden: torch.Tensor, layout: StepLayout, structured: StructuredStep | None) -> StepHandle:
        prompt_rows = layout.prompt_rows
        prompt_logits = None
        if any(map(_draft_token_ids, layout.scheduled)):
            return self._sample_verify(hidden, layout, structured)
        if prompt_rows:
            # Prompt logprobs need logits at prompt positions: take every token's (rare; prefill only).
            all_logits = self._logits(hidden, layout, np.arange(layout.num_scheduled_tokens))
            logits = all_logits[to_device(torch.from_numpy(layout.logits_indices), self.device)]
            rows = np.concatenate([p.rows for p in prompt_rows])
            prompt_logits = all_logits[to_device(torch.from_numpy(rows), self.device)]
        elif layout.logits_indices.shape[0]:
            logits = self._logits(hidden, layout, layout.logits_indices)
        else:
            self._last_sampled, self._last_ids = None, []
            return StepHandle.done(RunnerOutput(sampled_token_ids={}))
        reqs = layout.sampling_requests()
        batch = sampling_batch(reqs, self.model_config.eos_token_ids, structured)
        # Logprobs are of the raw distribution: take them before processors edit the logits in place.
        raw = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in batch.distinct_params) else None
        sampled = self.sampler(logits, batch) if reqs else torch.empty(0, dtype=torch.int64, device=self.device)
        self._last_sampled, self._last_ids = sampled, list(map(_request_id, reqs))
        finish = start_sample_output(
            sampled, raw, reqs, prompt_logits, prompt_rows, layout.scheduled, stable_ties=self.config.deterministic
        )
        return StepHandle(finish)

    def _sample_verify(self, hidden: torch.Tensor, layout: StepLayout, structured: StructuredStep | None) -> StepHandle:
        """A step with draft tokens: logits at every drafted position, the rejection sampler."""
        vrows = verify_rows(layout, self.model_config.eos_token_ids, structured)
        logits = self._logits(hidden, layout, vrows.token_rows)
        prompt_logits = None
        if layout.prompt_rows:
            prompt_logits = self._logits(hidden, layout, np.concatenate([p.rows for p in layout.prompt_rows]))
        self._last_sampled, self._last_ids = None, []  # speculative steps are never overlapped
        q = None if self.drafter is None else self.drafter.draft_probs(layout.sampling_requests(), vrows.counts, logits)
        return sample_verify(self.sampler, logits, vrows, layout, prompt_logits, q)

    @torch.inference_mode()
    def compute_logits(self, scheduler_output: SchedulerOutput, all_tokens: bool = False) -> torch.Tensor:
        """Run the step (writing the KV cache) and return float32 logits, without sampling.

        Rows: the last token of each request with ``sample=True``, or every
        scheduled token when ``all_tokens``. For tests and tools.
        """
        self._check_ready()
        rows = self.block_tables.apply(scheduler_output)
        layout = self.build_layout(scheduler_output.scheduled, self.block_tables, rows)
        hidden = self.run_model(self.prepare_inputs(layout))
        which = np.arange(layout.num_scheduled_tokens) if all_tokens else layout.logits_indices
        if not which.shape[0]:
            return hidden.new_empty((0, self.model_config.vocab_size), dtype=torch.float32)
        return self._logits(hidden, layout, which)

    def _forget_pools(self, scheduler_output: SchedulerOutput) -> None:
        """Drop partial pools of requests that ended or were preempted (they restart from position 0)."""
        self.pooler.forget(scheduler_output.finished_request_ids)
        self.pooler.forget(scheduler_output.preempted_request_ids)

    def shutdown(self) -> None:
        if self.drafter is not None:
            self.drafter.shutdown()
            self.drafter = None
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros``, but in host memory through an anonymous ``mmap``: the OS hands out zero pages as
    they are first written, so a KV pool sized for a full context costs resident memory only for the
    blocks in use (``torch.zeros`` writes every byte: 361 MB resident for ``kvik generate``'s 8k-token
    float32 pool before the first token).

    Not ``calloc`` (numpy's zeros), which did the same on paper but not in practice: glibc serves it from
    the heap when earlier frees raised its mmap threshold, and then clears (commits) every byte; and
    numpy marks allocations of 4 MB and more for transparent huge pages, so each first write committed
    2 MB around it (two of them per layer for a 20-token prompt). The map is asked for small pages
    for the same reason; it is unmapped when the last tensor viewing it is freed."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: calloc, which commits as pages are written there
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; a no-op where THP is off
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    # frombuffer keeps the map alive for as long as a view of it lives.
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)
