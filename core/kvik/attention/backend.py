"""The interface attention-backend plugins implement.

Framework-neutral: this module imports no array library. A backend is generic
over its array type (``torch.Tensor`` for the torch runners, ``mx.array`` for
MLX): ``class MyBackend(AttentionBackend["torch.Tensor"])``, and the runner
fills an ``AttentionMetadata`` of the same array type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar

ArrayT = TypeVar("ArrayT")  # the device array type: torch.Tensor, mx.array, ...

# Dtype names a backend may list in ``supported_dtypes`` (the names kvik's configs use).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Cache dtype names a backend may list in ``supported_kv_cache_dtypes`` (ResolvedConfig.kv_cache_dtype).
KV_CACHE_DTYPE_NAMES = ("auto", "fp8_e4m3")


@dataclass(slots=True)
class AttentionMetadata(Generic[ArrayT]):
    """One step's batch layout, built once by the model runner and shared by all layers.

    Tokens of all scheduled requests are flattened: request ``i`` owns rows
    ``query_start_loc[i]:query_start_loc[i+1]``; its K/V context is
    ``seq_lens[i]`` tokens long, of which the last ``query_lens[i]`` are new.
    (The arrays are the host layout of :class:`kvik.worker.kit.StepLayout`, on the device.)
    """

    num_tokens: int
    num_reqs: int
    query_start_loc: ArrayT  # [num_reqs + 1] int32, on device
    seq_lens: ArrayT  # [num_reqs] int32: cached + new tokens, on device
    block_tables: ArrayT  # [num_reqs, max_blocks] int32, padded with 0, on device
    slot_mapping: ArrayT  # [num_tokens] int64 (int32 on MLX): block_id * block_size + offset
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # An upper bound on every request's length over all steps that reuse this metadata's
    # plan (a runner replaying CUDA graphs sets max_model_len), or None: max_seq_len holds.
    # Backends that plan launch parameters from lengths (split-KV counts) plan for it.
    max_seq_len_bound: int | None = None
    # The same for query lengths: a bound the runner promises for the requests a plan is reused
    # for (a verify-shaped CUDA graph: k + 1 tokens per request; its padding may exceed it, which
    # must only cost speed), or None: max_query_len holds.
    max_query_len_bound: int | None = None
    # How many of the last requests are a runner's padding (dummies that bring a step to a captured
    # shape, :meth:`kvik.worker.kit.StepLayout.build`'s ``pad_to``): their rows are never read.
    num_padding_reqs: int = 0
    # Whatever a backend derives in prepare() (split-KV plans, masks, ...).
    backend_data: dict[str, Any] = field(default_factory=dict)
    # With several KV-cache groups (kvik.scheduling.kv_cache_groups) the fields above are group 0's, and
    # this holds groups 1, 2, ...: the step's metadata with each group's ``block_tables`` and
    # ``slot_mapping``, each prepared on its own. A layer reads its group's through :meth:`for_group`.
    other_kv_groups: tuple[AttentionMetadata[ArrayT], ...] = ()

    def for_group(self, group: int) -> AttentionMetadata[ArrayT]:
        """The metadata of KV-cache group ``group`` (this one for group 0, or when the step has one group)."""
        return self.other_kv_groups[group - 1] if group and self.other_kv_groups else self

    @property
    def all_kv_groups(self) -> tuple[AttentionMetadata[ArrayT], ...]:
        """Every group's metadata, group 0 (this one) first."""
        return (self, *self.other_kv_groups)

    def add_kv_groups(self, block_tables: Sequence[ArrayT], slot_mappings: Sequence[ArrayT]) -> None:
        """Give the step one metadata per further KV-cache group: ``block_tables[g]`` / ``slot_mappings[g]``
        are group ``g + 1``'s (group 0's are this metadata's own). Call before the backend's prepare()."""
        self.other_kv_groups = tuple(
            replace(self, block_tables=table, slot_mapping=slots, backend_data={}, other_kv_groups=())
            for table, slots in zip(block_tables, slot_mappings, strict=True)
        )

    @property
    def planned_max_seq_len(self) -> int:
        """The length to plan for: ``max_seq_len_bound`` when set, else ``max_seq_len``."""
        return self.max_seq_len if self.max_seq_len_bound is None else self.max_seq_len_bound

    @property
    def planned_max_query_len(self) -> int:
        """The query length to plan for: ``max_query_len_bound`` when set, else ``max_query_len``."""
        return self.max_query_len if self.max_query_len_bound is None else self.max_query_len_bound

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(slots=True)
class RotaryInputs(Generic[ArrayT]):
    """What a backend needs to rotate q and k itself (:meth:`AttentionBackend.forward_rotary`).

    The rotation is the neox / Hugging Face "rotate_half" one over the whole head: with ``h = head_size // 2``,
    ``out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h]`` and ``out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]``, each
    product and the sum rounded to the query dtype (what the eager module does). Where a norm weight is set,
    each head is first RMS-normalised (Qwen3's q/k norms): ``x * rsqrt(mean(x^2) + eps)`` in float32, rounded,
    times the weight, rounded.
    """

    cos: ArrayT  # [num_tokens, head_size], the query dtype
    sin: ArrayT  # [num_tokens, head_size]
    q_norm_weight: ArrayT | None = None  # [head_size], or None: no per-head norm
    k_norm_weight: ArrayT | None = None
    q_norm_eps: float = 0.0
    k_norm_eps: float = 0.0


class AttentionBackend(ABC, Generic[ArrayT]):
    """Paged attention for one layer shape.

    The model builds one instance per distinct (heads, head size, window)
    configuration. Capabilities are class data; :meth:`validate` turns them
    into reasons a configuration is refused.
    """

    name: ClassVar[str]
    # Dtype names (see DTYPE_NAMES) the backend computes in.
    supported_dtypes: ClassVar[tuple[str, ...]] = DTYPE_NAMES
    supported_head_sizes: ClassVar[tuple[int, ...] | None] = None  # None: any
    supported_device_types: ClassVar[tuple[str, ...]] = ("cpu",)
    supports_sliding_window: ClassVar[bool] = True
    # True when a captured CUDA graph of forward() replays correctly on new data of the
    # same shape: every launch parameter comes from host ints fixed by the batch shape
    # (planned with AttentionMetadata.planned_max_seq_len) and all per-step data is read
    # from the metadata's device arrays. Runners capture graphs only for such backends.
    supports_cuda_graphs: ClassVar[bool] = False
    # Gemma 2's attention logit soft-capping: ``cap * tanh(score / cap)`` before the mask
    # and softmax. A backend that implements it sets this and honours ``logits_soft_cap``.
    supports_logits_soft_cap: ClassVar[bool] = False
    # What the paged cache may hold (KV_CACHE_DTYPE_NAMES): "auto" is the model dtype; a backend
    # listing "fp8_e4m3" quantizes writes (x / scale, clamped to +-448) and dequantizes reads with
    # the layer's ``k_scale`` / ``v_scale`` whenever the cache tensor it is handed is float8_e4m3fn.
    supported_kv_cache_dtypes: ClassVar[tuple[str, ...]] = ("auto",)
    # Per-layer (per-tensor) FP8 scales: cache value = x / scale, x = cache value * scale. 1.0 until
    # the checkpoint's k_scale / v_scale are loaded (kv_scales_from_checkpoint then turns True).
    k_scale: float = 1.0
    v_scale: float = 1.0
    kv_scales_from_checkpoint: bool = False
    # Deterministic mode (``deterministic=True``): built with ``batch_invariant=True``, the backend
    # reduces each query row over its keys in an order fixed by the row's own request (fixed KV
    # tiles at absolute positions, no split count that depends on the batch, one kernel for decode
    # and prefill rows), so a row's output is bit-identical in any batch and any chunking.
    supports_batch_invariance: ClassVar[bool] = False
    # True when forward() is write_kv() then attend() (below) and write_kv reads nothing of the step but
    # the slot mapping: a runner replaying piecewise CUDA graphs then stores K/V inside its captured
    # segments and runs only attend() eagerly between them.
    splits_kv_write: ClassVar[bool] = False
    # True when every entry point (forward, forward_rotary, fuses_rotary, attend) reads the step through
    # ``metadata.for_group(self.kv_cache_group)``: a runner may then give layers with different windows
    # block tables of their own (kvik.scheduling.kv_cache_groups), and free what a window has passed.
    supports_kv_cache_groups: ClassVar[bool] = False
    # The KV-cache group whose block table this layer reads (set by the runner after building the layer).
    kv_cache_group: int = 0

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
        self.num_heads = num_heads
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        if logits_soft_cap is not None and not self.supports_logits_soft_cap:
            raise ValueError(f"attention backend {self.name!r} does not support attention logit soft-capping")
        self.logits_soft_cap = logits_soft_cap
        if batch_invariant and not self.supports_batch_invariance:
            raise ValueError(f"attention backend {self.name!r} has no batch-invariant mode (deterministic=True)")
        self.batch_invariant = batch_invariant

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
        """Reasons this backend cannot run the configuration (empty: it can)."""
        reasons = []
        if dtype not in cls.supported_dtypes:
            reasons.append(f"dtype {dtype} not in {', '.join(cls.supported_dtypes)}")
        if cls.supported_head_sizes is not None and head_size not in cls.supported_head_sizes:
            reasons.append(f"head size {head_size} not in {cls.supported_head_sizes}")
        if device_type not in cls.supported_device_types:
            reasons.append(f"device {device_type!r} not in {cls.supported_device_types}")
        if sliding_window is not None and not cls.supports_sliding_window:
            reasons.append("sliding window attention is not supported")
        return reasons

    def set_kv_scale(self, which: str, value: float) -> None:
        """Set the FP8 cache scale ``which`` ("k" or "v") read from the checkpoint; ValueError if not positive."""
        if not value > 0 or value == float("inf"):
            raise ValueError(f"the checkpoint's {which}_scale must be a positive finite number, got {value}")
        setattr(self, f"{which}_scale", float(value))
        self.kv_scales_from_checkpoint = True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor; index 0 selects K (0) or V (1)."""
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def cache_entries(kv_cache: ArrayT, slots: ArrayT) -> tuple[ArrayT, ArrayT]:
        """The K and V stored at ``slots`` (flat slot indices, block * block_size + offset), each
        [len(slots), num_kv_heads, head_size] in the cache's dtype. Where a block keeps an entry is the
        backend's business (a kernel may want another order inside a block than the shape suggests); tests
        and tools read a cache through this. The default: both planes laid out as ``kv_cache_shape`` reads,
        [block, offset, kv_head, dim]."""
        cache: Any = kv_cache  # torch.Tensor, mx.array, ...: they reshape and index alike
        num_kv_heads, head_size = cache.shape[-2], cache.shape[-1]
        return (
            cache[0].reshape(-1, num_kv_heads, head_size)[slots],
            cache[1].reshape(-1, num_kv_heads, head_size)[slots],
        )

    @classmethod
    def prepare(cls, metadata: AttentionMetadata[ArrayT]) -> None:
        """Derive per-step data into ``metadata.backend_data``; called once per step."""

    @abstractmethod
    def forward(
        self,
        query: ArrayT,  # [num_tokens, num_heads, head_size]
        key: ArrayT,  # [num_tokens, num_kv_heads, head_size]
        value: ArrayT,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: ArrayT,  # kv_cache_shape(...)
        metadata: AttentionMetadata[ArrayT],
    ) -> ArrayT:  # [num_tokens, num_heads, head_size]
        """Write ``key``/``value`` into ``kv_cache`` at ``metadata.slot_mapping``,
        then attend each new token to its request's context read through the
        block table: causal within the new tokens, full over cached ones, and
        limited to the last ``sliding_window`` positions when set; scores are
        soft-capped when ``logits_soft_cap`` is set.
        """

    def write_kv(self, key: ArrayT, value: ArrayT, kv_cache: ArrayT, slot_mapping: ArrayT) -> None:
        """Store ``key``/``value`` [num_tokens, num_kv_heads, head_size] at ``slot_mapping`` (negative: skip).
        Only called on backends with ``splits_kv_write``; its launch must depend on nothing but the shapes."""
        raise NotImplementedError(f"attention backend {self.name!r} does not store K/V apart from attention")

    def attend(self, query: ArrayT, kv_cache: ArrayT, metadata: AttentionMetadata[ArrayT], out: ArrayT) -> None:
        """:meth:`forward`'s attention alone, into ``out`` [num_tokens, num_heads, head_size], the step's K/V
        already in the cache (stored by :meth:`write_kv`). Only called on backends with ``splits_kv_write``."""
        raise NotImplementedError(f"attention backend {self.name!r} does not attend apart from storing K/V")

    def fuses_rotary(self, kv_cache: ArrayT, metadata: AttentionMetadata[ArrayT]) -> bool:
        """Whether this step may go through :meth:`forward_rotary`: the model then hands over q and k before
        their rotary embedding (and per-head norms) instead of rotating them itself. Asked once per layer
        call; the answer must depend only on the step's shape and the cache's dtype (it is fixed inside a
        captured CUDA graph)."""
        return False

    def forward_rotary(
        self,
        query: ArrayT,  # [num_tokens, num_heads, head_size], not yet rotated
        key: ArrayT,  # [num_tokens, num_kv_heads, head_size], not yet rotated
        value: ArrayT,
        rotary: RotaryInputs[ArrayT],
        kv_cache: ArrayT,
        metadata: AttentionMetadata[ArrayT],
    ) -> ArrayT:
        """:meth:`forward` on ``rotary``'s rotation of ``query`` and ``key`` (what is cached is the rotated
        key). Only called when :meth:`fuses_rotary` said yes for the step; a backend that says yes saves
        the model a pass over q and k (a kernel launch per layer on a GPU)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not rotate q and k itself")
