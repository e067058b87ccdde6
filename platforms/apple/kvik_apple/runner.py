"""The MLX model runner: SchedulerOutput in, sampled tokens out, no torch anywhere.

Built on the runner kit (kvik.worker.kit): the kit flattens the step into
numpy arrays and keeps the block tables from the scheduler's deltas; the hooks
here turn the layout into MLX arrays (``prepare_inputs``), run the model over
the paged cache (``run_model``), compute logits only for rows that sample (or
want prompt logprobs), sample, then evaluate the lazy MLX graph once (tokens
plus the updated caches) and hand plain Python lists back to the engine (``sample``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from kvik.attention.backend import AttentionMetadata
from kvik.config import WeightsMode
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.interface import StepHandle
from kvik.worker.kit import KitModelRunner, StepLayout, assemble_output, sampling_batch

from kvik_apple.attention import MLXPagedAttentionBackend
from kvik_apple.logprobs import gather_logprobs, to_host
from kvik_apple.model import LlamaArgs, MLXCausalLM
from kvik_apple.sampler import MLXSampler
from kvik_apple.weights import checkpoint_path, is_gguf, load_into, parameter_bytes, read_gguf, read_safetensors_dir

if TYPE_CHECKING:
    from kvik.config import ModelConfig, ResolvedConfig
    from kvik.platforms.interface import Platform
    from kvik.structured.manager import StructuredStep

logger = logging.getLogger(__name__)

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(slots=True)
class MLXInputs:
    input_ids: mx.array  # [num_tokens] int32
    positions: mx.array  # [num_tokens] int32
    metadata: AttentionMetadata[mx.array]


class MLXModelRunner(KitModelRunner[MLXInputs, mx.array]):
    # execute() applies SchedulerOutput.structured's grammar bitmask (MLXSampler's first processor).
    supports_structured_output = True

    def __init__(self, config: ResolvedConfig, model_config: ModelConfig, platform: Platform) -> None:
        if model_config.dtype not in _MX_DTYPES:
            raise ValueError(
                f"the apple platform computes in {', '.join(_MX_DTYPES)}; got dtype {model_config.dtype!r}"
            )
        super().__init__(config.block_size)
        self.config = config
        self.model_config = model_config
        self.platform = platform
        self.dtype = _MX_DTYPES[model_config.dtype]
        self.model: MLXCausalLM | None = None
        self.kv_caches: list[mx.array] = []
        self.num_blocks = 0
        self.quantized = False
        self.sampler = MLXSampler(seed=config.seed)

    # -- set-up ---------------------------------------------------------------
    def _attention_backend(self) -> MLXPagedAttentionBackend:
        from kvik.plugins.manager import get_plugin_manager

        mc = self.model_config
        cls = get_plugin_manager().attention_backends.get(self.config.attention_backend)
        if not issubclass(cls, MLXPagedAttentionBackend):
            raise ValueError(f"the MLX runner needs an MLX attention backend, got {cls.name!r}")
        return cls(mc.num_heads, mc.head_dim, mc.num_kv_heads, mc.head_dim**-0.5, mc.sliding_window)

    def load_model(self) -> None:
        mc = self.model_config
        args = LlamaArgs.from_hf(mc.hf_config, mc.architecture)
        model = MLXCausalLM(args, self._attention_backend())
        path = checkpoint_path(mc.source, self.config.model)
        if is_gguf(path):
            self.quantized = self.config.quantized_weights is WeightsMode.QUANTIZED
            weights = read_gguf(path, args)
        else:
            if mc.quantization is not None:
                raise ValueError(
                    f"the apple (MLX) platform cannot load {mc.quantization!r}-quantized safetensors; "
                    "it runs dense safetensors checkpoints and GGUF files (Q4_0, Q4_1, Q8_0, F16, F32)"
                )
            weights = read_safetensors_dir(path)
        logger.info("loading %s into MLX (%s, %s weights)", path, mc.dtype, "quantized" if self.quantized else "dense")
        load_into(model, weights, self.dtype, self.quantized)
        self.model = model

    def weight_bytes(self) -> int:
        assert self.model is not None, "load_model() first"
        return parameter_bytes(self.model)

    def kv_block_bytes(self, block_size: int) -> int:
        mc = self.model_config
        return 2 * mc.num_layers * block_size * mc.num_kv_heads * mc.head_dim * self.dtype.size

    def _allocate(self, num_blocks: int) -> list[mx.array]:
        mc = self.model_config
        shape = MLXPagedAttentionBackend.kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        caches = [mx.zeros(shape, dtype=self.dtype) for _ in range(mc.num_layers)]
        mx.eval(caches)
        return caches

    def profile(self) -> int:
        """Peak activation bytes of a maximal step (max_num_batched_tokens tokens).

        On Metal this runs the dummy step and reads MLX's peak-memory counter.
        MLX's Linux CPU wheel multiplies matrices with the reference BLAS it
        bundles (~2 GFLOP/s), where a 1024-token step of a 135M model takes
        minutes, so there the same quantity is computed from the shapes
        (:func:`estimate_activation_bytes`) instead.
        """
        from kvik_apple.platform import metal_available

        if not metal_available():
            return estimate_activation_bytes(self.model_config, self.config, self.dtype.size)
        return self._measure_step_peak()

    def _measure_step_peak(self) -> int:
        tokens = self.config.max_num_batched_tokens
        seqs = min(self.config.max_num_seqs, tokens)
        lengths = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
        lengths = [min(n, self.model_config.max_model_len) for n in lengths if n > 0]
        blocks_per = [-(-n // self.block_size) for n in lengths]
        saved, saved_blocks = self.kv_caches, self.num_blocks
        self.kv_caches, self.num_blocks = self._allocate(sum(blocks_per)), sum(blocks_per)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        scheduled, next_block = [], 0
        for i, (n, nb) in enumerate(zip(lengths, blocks_per, strict=True)):
            ids = list(range(next_block, next_block + nb))  # the temporary cache's blocks
            next_block += nb
            scheduled.append(ScheduledRequest(f"profile-{i}", [0] * n, 0, ids, True, SamplingParams(temperature=0)))
        try:
            self.run_dummy_step(scheduled)
            return int(max(0, mx.get_peak_memory() - base))
        finally:
            self.kv_caches, self.num_blocks = saved, saved_blocks
            mx.clear_cache()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = self._allocate(num_blocks)
        self.num_blocks = num_blocks

    # -- one step (the kit's hooks) ---------------------------------------------
    def execute_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        assert self.model is not None and self.kv_caches, "load_model() and initialize_kv_cache() first"
        return super().execute_async(scheduler_output)

    def prepare_inputs(self, layout: StepLayout) -> MLXInputs:
        metadata = AttentionMetadata(
            num_tokens=layout.num_tokens,
            num_reqs=layout.num_reqs,
            query_start_loc=mx.array(layout.query_start_loc),
            seq_lens=mx.array(layout.seq_lens),
            block_tables=mx.array(layout.block_table),
            slot_mapping=mx.array(layout.slot_mapping.astype(np.int32)),
            block_size=layout.block_size,
            max_query_len=layout.max_query_len,
            max_seq_len=layout.max_seq_len,
            query_lens_cpu=layout.query_lens_cpu,
            seq_lens_cpu=layout.seq_lens_cpu,
        )
        MLXPagedAttentionBackend.prepare(metadata)
        ids = mx.array(layout.token_ids.astype(np.int32))
        return MLXInputs(ids, mx.array(layout.positions.astype(np.int32)), metadata)

    def run_model(self, inputs: MLXInputs) -> mx.array:
        assert self.model is not None
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)  # [T, hidden]

    def sample(self, hidden: mx.array, layout: StepLayout, structured: StructuredStep | None) -> StepHandle:
        assert self.model is not None
        reqs = layout.sampling_requests()
        to_eval: list[mx.array] = list(self.kv_caches)
        tokens = sample_lp = prompt_lp = None
        if reqs:
            logits = self.model.compute_logits(hidden[mx.array(layout.logits_indices.astype(np.int32))])  # [n, vocab]
            tokens = self.sampler(logits, sampling_batch(reqs, self.model_config.eos_token_ids, structured))
            to_eval.append(tokens)
            ks = [r.sampling_params.logprobs for r in reqs]
            if any(k is not None for k in ks):  # of the raw logits (MLX arrays are immutable)
                sample_lp = gather_logprobs(logits, tokens, min(max(k or 0 for k in ks), logits.shape[-1]))
                to_eval.extend(sample_lp)
        prompt_rows = layout.prompt_rows
        if prompt_rows:
            flat = np.concatenate([pr.rows for pr in prompt_rows]).astype(np.int32)
            plogits = self.model.compute_logits(hidden[mx.array(flat)])
            targets = mx.array([t for pr in prompt_rows for t in pr.targets], dtype=mx.int32)
            k = max(layout.scheduled[pr.index].sampling_params.prompt_logprobs or 0 for pr in prompt_rows)
            prompt_lp = gather_logprobs(plogits, targets, min(k, plogits.shape[-1]))
            to_eval.extend(prompt_lp)
        mx.eval(to_eval)  # the step's one evaluation: tokens, logprobs and the updated caches
        output = assemble_output(
            reqs,
            np.zeros(0, dtype=np.int64) if tokens is None else np.array(tokens),
            None if sample_lp is None else to_host(sample_lp),
            layout.scheduled,
            prompt_rows,
            None if prompt_lp is None else to_host(prompt_lp),
        )
        return StepHandle.done(output)

    def shutdown(self) -> None:
        self.model = None
        self.kv_caches = []
        mx.clear_cache()


def estimate_activation_bytes(model_config: ModelConfig, config: ResolvedConfig, itemsize: int) -> int:
    """Upper estimate of one step's live activations: one layer's intermediates at a time (MLX
    frees a layer's temporaries once the next consumes them), the attention scores of the
    longest chunk, and the logits of every sampled row; x2 for MLX's allocator slack.
    """
    mc = model_config
    tokens = config.max_num_batched_tokens
    rows = min(config.max_num_seqs, tokens)
    context = mc.max_model_len  # a chunk attends to at most the whole context
    qkv = tokens * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    intermediate = int(getattr(mc.hf_config, "intermediate_size", 4 * mc.hidden_size))
    layer = 4 * tokens * mc.hidden_size + qkv + 3 * tokens * intermediate
    gathered = 2 * context * mc.num_kv_heads * mc.head_dim
    scores = 4 * mc.num_heads * tokens * context  # float32 softmax
    logits = 4 * 3 * rows * mc.vocab_size  # float32 logits, probabilities, sort order
    return 2 * ((layer + gathered) * itemsize + scores + logits)
