"""The ``triton`` attention backend: paged attention in Triton kernels.

Importing this module does not import triton; the kernels load on first use,
and :meth:`TritonAttentionBackend.validate` explains when triton is missing.

CPU tensors: the kernels also run under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how CI checks them on machines without a
GPU. The backend still declares ``supported_device_types = ("cuda",)``: the
interpreter is a test tool (thousands of times slower), so the tests use a
subclass that adds ``"cpu"`` rather than the real backend claiming it.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, ClassVar

import torch
from kvik.attention.backend import AttentionBackend, AttentionMetadata, RotaryInputs

_LOG2E = 1.4426950408889634
MIN_HEAD_SIZE = 16  # tl.dot needs K >= 16
MAX_HEAD_SIZE = 256  # the accumulator tile lives in registers
MAX_SPLITS = 32
# Steps whose requests add at most this many query tokens (speculative verify steps, planned with
# AttentionMetadata.planned_max_query_len) take the decode tile and split-KV like decode steps:
# with the prefill tile a 5-token verify step of one request ran 16 programs over its whole context.
SMALL_QUERY = 16


def _check_block_contiguous(kv_cache: torch.Tensor) -> None:
    """An FP8 cache's V addresses are computed from the block's own extent (keys-contiguous layout), so
    within a block the cache must be dense, as kv_cache_shape's tensor is."""
    _, _, _, num_kv_heads, head_size = kv_cache.shape
    assert kv_cache.stride()[2:] == (num_kv_heads * head_size, head_size, 1), "an FP8 cache's blocks must be dense"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernels() -> Any:
    from kvik_triton_attention import kernels

    return kernels


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number exercises the split path


class TritonAttentionBackend(AttentionBackend[torch.Tensor]):
    """GQA-aware paged attention for mixed prefill/decode batches, with a
    split-KV (flash-decoding) path for small decode and verify batches over long contexts."""

    name: ClassVar[str] = "triton"
    supported_dtypes: ClassVar[tuple[str, ...]] = ("float16", "bfloat16", "float32")
    supported_device_types: ClassVar[tuple[str, ...]] = ("cuda",)
    supports_sliding_window: ClassVar[bool] = True
    supports_logits_soft_cap: ClassVar[bool] = True
    # Every launch parameter comes from host ints fixed by the batch shape (the split
    # count from metadata.planned_max_seq_len) and all per-step data is read from device
    # tensors, so a captured CUDA graph replays correctly on new data of the same shape.
    supports_cuda_graphs: ClassVar[bool] = True
    # forward() is write_kv (a launch over the slot mapping alone) then attend: piecewise CUDA graphs store
    # K/V inside their captured segments.
    splits_kv_write: ClassVar[bool] = True
    # An FP8 (e4m3) cache: quantized in write_kv_kernel, widened and scaled in registers on read. Its blocks
    # store V keys-contiguous, [kv_heads, head_size, block_size] (K keeps kv_cache_shape's layout): P @ V sums
    # over keys, and an 8-bit operand can only be read 4 keys at a time when they sit side by side
    # (kernels._attend_tile; :meth:`cache_entries` reads either layout back).
    # NVIDIA GPUs need compute capability >= 8.9 for Triton's fp8e4nv (the cuda platform checks).
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto", "fp8_e4m3")
    # Tile shapes, (BLOCK_M rows, BLOCK_N keys, num_warps); class data so that
    # benchmarks and tests can try others through a subclass.
    decode_tile: ClassVar[tuple[int, int, int]] = (16, 64, 4)
    prefill_tile: ClassVar[tuple[int, int, int]] = (64, 64, 4)
    num_stages: ClassVar[int] = 2
    # Decode with an FP8 cache (keys-contiguous V): two warps over 64 keys, three stages. H200, 8B shape
    # (docs/benchmarks.md, run f2): 256 requests x 830 tokens 138 µs (3.2 TB/s), 256 x 2,048 302 µs, against
    # 193 / 402 for the best tile over V stored like K; a bf16 cache takes 220 / 505.
    fp8_decode_tile: ClassVar[tuple[int, int, int]] = (16, 64, 2)
    fp8_decode_stages: ClassVar[int] = 3
    # None: choose per step from the batch and the GPU's SM count; an int forces
    # the split count for decode and verify steps (tests, benchmarks).
    force_num_splits: ClassVar[int | None] = None
    # Deterministic mode: one tile for every step (decode-only, prefill and mixed alike) and no
    # split-KV, so a query row's reduction over keys never depends on what else the step holds.
    supports_batch_invariance: ClassVar[bool] = True
    supports_kv_cache_groups: ClassVar[bool] = True
    invariant_tile: ClassVar[tuple[int, int, int]] = (32, 64, 4)
    # Prefill/mixed steps and split decode run the KV tiles every row sees whole without masks (the same
    # arithmetic, kernels.py says why): H200 run a8, 2,048-token prefill 205 -> 248 TFLOP/s (SDPA-flash 397). Off for
    # decode without splits (a second loop slowed large batches) and with logit soft-capping: on the H200
    # (2026-12-03) whole and masked tiles gave the same bits without a cap, different ones with it (the
    # compiler's code for the cap differs between the two), and batch-invariant mode relies on equal bits.
    unmask_full_tiles: ClassVar[bool] = True

    @classmethod
    def validate(
        cls,
        *,
        head_size: int,
        dtype: str,
        device_type: str,
        block_size: int,
        sliding_window: int | None,
    ) -> list[str]:
        reasons = super().validate(
            head_size=head_size,
            dtype=dtype,
            device_type=device_type,
            block_size=block_size,
            sliding_window=sliding_window,
        )
        if importlib.util.find_spec("triton") is None:
            reasons.append("the triton package is not installed (it ships with CUDA/ROCm builds of torch)")
        if not MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE:
            reasons.append(f"head size {head_size} is outside [{MIN_HEAD_SIZE}, {MAX_HEAD_SIZE}]")
        if block_size < 1:
            reasons.append(f"block size must be positive, got {block_size}")
        return reasons

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        batch_invariant: bool = False,
    ) -> None:
        super().__init__(num_heads, head_size, num_kv_heads, scale, sliding_window, logits_soft_cap, batch_invariant)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.group = num_heads // num_kv_heads
        self.head_pad = max(MIN_HEAD_SIZE, _next_pow2(head_size))

    def _tile(self, decode: bool, fp8: bool = False) -> tuple[int, int, int, int, int]:
        """(BLOCK_M, BLOCK_Q, BLOCK_N, num_warps, num_stages) for this layer shape.

        Batch-invariant: the same tile whatever the step holds. The kernel's KV tiles sit at
        absolute key positions and a row's reduction runs over them in order, so with one tile
        shape a row gets the same arithmetic in any batch, at any place in a query block, and
        whichever chunk of its prompt it arrives in (tiles past a row's last key are fully
        masked and leave its running max, sum and accumulator exactly as they were).
        """
        stages = self.num_stages
        if self.batch_invariant:
            decode = False
            block_m, block_n, warps = self.invariant_tile
        elif decode and fp8:
            block_m, block_n, warps = self.fp8_decode_tile
            stages = self.fp8_decode_stages
        else:
            block_m, block_n, warps = self.decode_tile if decode else self.prefill_tile
        block_m = max(block_m, _next_pow2(self.group))
        if self.head_pad > 128:  # keep the fp32 accumulator within registers
            block_n = min(block_n, 32)
            warps = max(warps, 8) if not decode else warps
        return block_m, block_m // self.group, block_n, warps, stages

    @staticmethod
    def cache_entries(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_cache.dtype != torch.float8_e4m3fn:
            return AttentionBackend.cache_entries(kv_cache, slots)
        _, num_blocks, block_size, num_kv_heads, head_size = kv_cache.shape
        raw = kv_cache.view(torch.uint8)  # not every device indexes float8 tensors
        k = raw[0].reshape(-1, num_kv_heads, head_size)[slots]
        # V: each block [kv_heads, head_size, block_size]
        v = raw[1].reshape(num_blocks, num_kv_heads, head_size, block_size)[slots // block_size, :, :, slots % block_size]
        return k.view(kv_cache.dtype), v.view(kv_cache.dtype)

    @staticmethod
    def small_query(metadata: AttentionMetadata[torch.Tensor]) -> bool:
        """Decode and verify steps (at most :data:`SMALL_QUERY` tokens per request, as planned)."""
        return metadata.planned_max_query_len <= SMALL_QUERY

    def num_splits(self, metadata: AttentionMetadata[torch.Tensor], device: torch.device, block_n: int) -> int:
        """KV splits for this step: >1 only for decode and verify steps too small to fill the GPU (never
        when batch-invariant: the split count depends on the batch, and splits change the reduction order)."""
        if not self.small_query(metadata) or self.batch_invariant:
            return 1
        if self.force_num_splits is not None:
            return self.force_num_splits
        # Programs without splits: one per (query block, KV head); a decode step has one block per request.
        blocks = metadata.num_reqs
        if not metadata.is_decode_only:
            blocks += metadata.num_tokens // self._tile(True)[1]
        programs = blocks * self.num_kv_heads
        sms = _num_sms(device)
        if programs >= sms:
            return 1
        # A runner that replays CUDA graphs sets max_seq_len_bound to the longest length any
        # replay may see, so the split count (a compile-time constant) is planned for all of them.
        max_seq_len = metadata.planned_max_seq_len
        # About two programs per SM, and at least two KV tiles per split.
        splits = min(-(-2 * sms // programs), max_seq_len // (2 * block_n), MAX_SPLITS)
        return 1 << (max(splits, 1).bit_length() - 1)  # round down to a power of two: fewer compiled variants

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store ``key``/``value`` [num_tokens, num_kv_heads, head_size] at ``slot_mapping`` (negative: skip)."""
        num_tokens = key.shape[0]
        if num_tokens == 0:
            return
        assert key.stride(-1) == 1 and value.stride(-1) == 1 and kv_cache.stride(-1) == 1
        fp8 = kv_cache.dtype == torch.float8_e4m3fn
        if fp8:  # the kernel writes the e4m3 bits itself (same bytes, same strides)
            kv_cache = kv_cache.view(torch.uint8)
        if fp8:
            _check_block_contiguous(kv_cache)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        _kernels().write_kv_kernel[(num_tokens,)](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            float(self.k_scale),
            float(self.v_scale),
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_KV_HEADS=self.num_kv_heads,
            HEADS_PAD=_next_pow2(self.num_kv_heads),
            HEAD_SIZE=self.head_size,
            HEAD_PAD=self.head_pad,
            KV_BLOCK_SIZE=k_cache.shape[1],
            FP8=fp8,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        metadata = metadata.for_group(self.kv_cache_group)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        # The in-kernel K/V write, measured on an H200 (docs/benchmarks.md, 2026-12-01): the same tokens as
        # write_kv_kernel, eager and under CUDA graphs, and 0.1-0.4% faster batch-1 decode (8B, Qwen3-30B-A3B).
        fused = self._writes_kv_in_attention(kv_cache, metadata) and key.stride(-1) == 1 and value.stride(-1) == 1
        if not fused:
            self.write_kv(key, value, kv_cache, metadata.slot_mapping)
        if metadata.num_reqs == 0 or query.shape[0] == 0:
            return out
        self.attend(query, kv_cache, metadata, out, (key, value) if fused else None)
        return out

    @staticmethod
    def _writes_kv_in_attention(kv_cache: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> bool:
        """A decode-only step (one new row per request, also in every replay of its plan) with a 16/32-bit
        cache: the attention kernel stores the new K/V itself (FP8 quantizes in write_kv_kernel)."""
        return metadata.planned_max_query_len == 1 and metadata.num_reqs > 0 and kv_cache.dtype != torch.float8_e4m3fn

    def fuses_rotary(self, kv_cache: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]) -> bool:
        """Decode-only steps whose new K/V the kernel stores itself also rotate q and k there, saving the
        rotary kernel's launch per layer. Not in deterministic mode: the kernel's RMSNorm sums a head in
        another order than the separate rotary kernel that prefill rows take, and a row must get the same
        bits in a decode-only step as in a mixed one."""
        group = metadata.for_group(self.kv_cache_group)
        return not self.batch_invariant and self._writes_kv_in_attention(kv_cache, group)

    def forward_rotary(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rotary: RotaryInputs[torch.Tensor],
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        metadata = metadata.for_group(self.kv_cache_group)
        assert self.fuses_rotary(kv_cache, metadata), "forward_rotary outside a step fuses_rotary accepted"
        assert key.stride(-1) == 1 and value.stride(-1) == 1
        assert rotary.cos.stride(-1) == 1 and rotary.sin.stride(-1) == 1
        assert (rotary.q_norm_weight is None) == (rotary.k_norm_weight is None), "q and k are normed together"
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        self.attend(query, kv_cache, metadata, out, (key, value), rotary)
        return out

    def attend(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata[torch.Tensor],
        out: torch.Tensor,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        rotary: RotaryInputs[torch.Tensor] | None = None,
    ) -> None:
        """Attention over the cache into ``out`` [num_tokens, num_heads, head_size]. The cache holds this step's
        K/V already, or ``new_kv`` = (key, value) of a decode-only step (one row per request), stored by the
        kernel itself at ``metadata.slot_mapping``; with ``rotary`` (only with ``new_kv``), ``query`` and the
        new key are rotated (and normed) in the kernel."""
        metadata = metadata.for_group(self.kv_cache_group)
        kernels = _kernels()
        assert query.stride(-1) == 1 and out.stride(-1) == 1 and kv_cache.stride(-1) == 1
        assert rotary is None or new_kv is not None, "rotating in the kernel needs the new K in the kernel"
        new_k, new_v = new_kv if new_kv is not None else (query, query)  # unused pointers when not writing
        cos, sin = (rotary.cos, rotary.sin) if rotary is not None else (query, query)  # unused when not rotating
        norm = rotary is not None and rotary.q_norm_weight is not None
        q_norm, k_norm = (rotary.q_norm_weight, rotary.k_norm_weight) if norm else (query, query)  # type: ignore[union-attr]
        num_tokens = query.shape[0]
        fp8 = kv_cache.dtype == torch.float8_e4m3fn  # the scales and the keys-contiguous V are an FP8 cache's
        block_m, block_q, block_n, warps, stages = self._tile(self.small_query(metadata), fp8)
        kv_block_size = kv_cache.shape[2]
        if fp8:
            _check_block_contiguous(kv_cache)
        splits = self.num_splits(metadata, query.device, block_n)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_scale, v_scale = (float(self.k_scale), float(self.v_scale)) if fp8 else (1.0, 1.0)
        grid = (num_tokens // block_q + metadata.num_reqs, self.num_kv_heads, splits)
        if splits > 1:
            # Partial results, shared by all layers of the step (layers run one after another).
            key = ("triton_split_buffers", num_tokens, self.num_heads, splits, self.head_pad, query.device)
            buffers = metadata.backend_data.get(key)
            if buffers is None:
                shape = (num_tokens, self.num_heads, splits)
                buffers = (
                    torch.empty((*shape, self.head_pad), dtype=torch.float32, device=query.device),
                    torch.empty(shape, dtype=torch.float32, device=query.device),
                    torch.empty(shape, dtype=torch.float32, device=query.device),
                )
                metadata.backend_data[key] = buffers
            target, part_m, part_l = buffers
        else:
            target, part_m, part_l = out, out, out  # the stat pointers are unused
        kernels.paged_attention_kernel[grid](
            query,
            k_cache,
            v_cache,
            target,
            part_m,
            part_l,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            new_k,
            new_v,
            metadata.slot_mapping,
            cos,
            sin,
            q_norm,
            k_norm,
            rotary.q_norm_eps if rotary is not None else 0.0,
            rotary.k_norm_eps if rotary is not None else 0.0,
            self.scale * _LOG2E * k_scale,
            v_scale,
            metadata.num_reqs,
            self.num_heads,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            metadata.block_tables.stride(0),
            new_k.stride(0),
            new_k.stride(1),
            new_v.stride(0),
            new_v.stride(1),
            cos.stride(0),
            sin.stride(0),
            G=self.group,
            SLIDING_WINDOW=self.sliding_window or 0,
            SOFT_CAP=float(self.logits_soft_cap or 0.0),
            BLOCK_M=block_m,
            BLOCK_Q=block_q,
            BLOCK_N=block_n,
            HEAD_SIZE=self.head_size,
            HEAD_PAD=self.head_pad,
            KV_BLOCK_SIZE=k_cache.shape[1],
            NUM_SPLITS=splits,
            # fp32 (interpreter tests): exact products; 16-bit: Triton's default (the option
            # only concerns fp32, and backends differ in which values they accept).
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
            WRITE_KV=new_kv is not None,
            ROTARY=rotary is not None,
            QK_NORM=norm,
            UNMASKED_FULL_TILES=self.unmask_full_tiles and not self.logits_soft_cap
            and (not self.small_query(metadata) or splits > 1),
            # Runs of keys that stay inside one block: a power of two dividing the tile and the block size.
            V_CHUNK=min(block_n, kv_block_size & -kv_block_size) if fp8 else 0,
            num_warps=warps,
            num_stages=stages,
        )
        if splits > 1:
            kernels.reduce_splits_kernel[(num_tokens, self.num_heads)](
                target,
                part_m,
                part_l,
                out,
                out.stride(0),
                out.stride(1),
                self.num_heads,
                NUM_SPLITS=splits,
                SPLITS_PAD=max(2, _next_pow2(splits)),
                HEAD_SIZE=self.head_size,
                HEAD_PAD=self.head_pad,
                num_warps=4,
            )
