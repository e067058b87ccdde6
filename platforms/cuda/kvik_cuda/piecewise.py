"""Piecewise CUDA graphs: prefill and mixed steps replayed as graphs of everything but attention.

A decode step has one row per request, so a few dozen batch sizes cover it and
the whole forward is one captured graph (:mod:`kvik_cuda.runner`). A step that
carries prompt tokens has a ragged layout (how many requests, how long each)
that a graph cannot replay over, but only attention reads that layout: the
projections, norms, rotary, MLP and LM-head inputs see a plain ``[tokens,
hidden]`` matrix. So such a step runs as vLLM's piecewise graphs do: the
forward is cut at each attention call into segments; each segment is one CUDA
graph per padded token count, and attention runs eagerly between them on the
step's real metadata. A small model's prefill step drops from hundreds of eager
launches (tens of milliseconds of host time on a slow host) to one replay per
layer plus the attention kernels.

How the forward is cut: :class:`PiecewiseCapture` runs the model once per size
and, for the length of that run, shadows each attention backend's ``forward``
with its own. When the model calls attention, the hook copies q/k/v into static
buffers (inside the open graph), ends that graph, runs the real attention on
the buffers, copies its output into a static buffer, begins the next graph and
hands that buffer back to the model. A backend with ``splits_kv_write`` (the
Triton one) stores K/V inside the graph instead, its store reading only the
runner's persistent slot buffer, and attends straight into the output buffer:
one eager launch per layer. The buffers are shared by every layer and
every size (only one layer runs at a time), so only they, not each layer's q/k/v,
must outlive a segment; everything else a segment allocates comes from the
runner's graph pool and is reused by later segments in capture order, which is
also replay order. The hook also answers ``fuses_rotary`` with False: the
model rotates q and k itself, inside the graph, for every backend.

An encoder's forward is cut the same way, at each
:class:`~kvik.layers.bidirectional.EncoderAttention` call: its packed q | k | v
rows go to a static buffer, the eager call attends over the replayed step's
requests (read from the step's metadata) into the output buffer. An encoder
keeps no KV cache and samples nothing, so these are its only graphs.

A step runs here only when its layout was padded to a captured size: the CUDA
runner appends an absorber request (:meth:`kvik.worker.kit.StepLayout.build`'s
``pad_tokens_to``) whose rows sit in the null block. With ``enforce_eager`` the
runner pads the same steps the same way, so eager and replayed steps launch the
same kernels on the same shapes and give the same bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from kvik.attention.backend import AttentionBackend, AttentionMetadata
from kvik.config import ModelConfig
from kvik.layers.bidirectional import EncoderAttention

SMALLEST_SIZE = 16  # rows: a prompt shorter than this pads up to it
STEPS_PER_OCTAVE = 8  # sizes between two powers of two: padding wastes at most 1/8 of a step
# A step's eager forward costs its host ~1.2 ms per decoder layer (an H200 host: SmolLM2's 30 layers took
# 36 ms, docs/benchmarks.md run x); its linears cost the GPU 2 * T * P FLOPs per layer of P parameters, at
# ~600 TFLOP/s. The two meet at T * P = 3.6e11: beyond that the launches hide behind the GPU work and a
# graph's padding would only add rows (the 8B shape: ~1,650 tokens; SmolLM2's: every step).
LAUNCHES_HIDDEN_AT_TOKEN_PARAMS = 3.6e11


def piecewise_sizes(max_tokens: int, smallest: int = SMALLEST_SIZE) -> list[int]:
    """Token counts to capture, ascending, ending at ``max_tokens``: multiples of ``smallest``, spaced by
    ``1/STEPS_PER_OCTAVE`` of the power of two below them once that exceeds ``smallest`` (so above
    ``STEPS_PER_OCTAVE * smallest`` tokens a step pads by less than ``1/STEPS_PER_OCTAVE``)."""
    sizes: list[int] = []
    size = smallest
    while size < max_tokens:
        sizes.append(size)
        size += max(smallest, (1 << (size.bit_length() - 1)) // STEPS_PER_OCTAVE)
    sizes.append(max_tokens)
    return sizes


def default_max_tokens(model_config: ModelConfig, budget: int) -> int:
    """The largest step worth a piecewise graph: where a step's GPU work starts to hide its eager launches
    (at least 512 tokens, at most ``budget``)."""
    hidden = model_config.hidden_size
    inter = int(getattr(model_config.hf_config, "intermediate_size", None) or 4 * hidden)
    attention = hidden * model_config.head_dim * (2 * model_config.num_heads + 2 * model_config.num_kv_heads)
    params = attention + 3 * hidden * inter
    return min(budget, max(512, int(LAUNCHES_HIDDEN_AT_TOKEN_PARAMS / params)))


@dataclass(slots=True)
class AttentionCall:
    """One attention call between two segments: the layer and the static tensors it reads and writes."""

    layer: AttentionBackend[torch.Tensor]
    query: torch.Tensor  # views of the shared static buffers, [size, heads, head_dim]
    kv_cache: torch.Tensor
    out: torch.Tensor
    # The new K/V's buffers; None where the layer splits_kv_write (the segment before stored them).
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def run(self, metadata: AttentionMetadata[torch.Tensor]) -> None:
        layer = self.layer
        if self.key is None or self.value is None:
            layer.attend(self.query, self.kv_cache, metadata, self.out)
        else:
            self.out.copy_(type(layer).forward(layer, self.query, self.key, self.value, self.kv_cache, metadata))


@dataclass(slots=True)
class EncoderCall:
    """One encoder attention call between two segments: packed q | k | v rows in, attention rows out."""

    layer: EncoderAttention
    qkv: torch.Tensor  # a view of the shared static buffer, [size, 3 * heads * head_dim]
    out: torch.Tensor  # [size, heads * head_dim]

    def run(self, metadata: AttentionMetadata[torch.Tensor]) -> None:
        self.layer.attend(self.qkv, metadata, self.out)


@dataclass(slots=True)
class PiecewiseGraph:
    """One size's forward: ``segments[0]``, ``calls[0]``, ``segments[1]``, ... ``segments[-1]``."""

    segments: list[Any] = field(default_factory=list)  # torch.cuda.CUDAGraph (any object with replay())
    calls: list[AttentionCall | EncoderCall] = field(default_factory=list)
    output: torch.Tensor | None = None  # the forward's hidden states, rewritten by each replay

    def replay(self, metadata: AttentionMetadata[torch.Tensor]) -> torch.Tensor:
        """Run the step whose inputs (ids, positions, metadata) are in the buffers captured over."""
        assert self.output is not None and len(self.segments) == len(self.calls) + 1
        for segment, call in zip(self.segments[:-1], self.calls, strict=True):
            segment.replay()
            call.run(metadata)
        self.segments[-1].replay()
        return self.output


class StaticAttentionBuffers:
    """Buffers of ``max_tokens`` rows, one per role (q, k, v, out) and row shape, shared by every layer and size."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def like(self, role: str, tensor: torch.Tensor) -> torch.Tensor:
        """The first ``len(tensor)`` rows of ``role``'s buffer for tensors shaped like it (allocated on first use)."""
        return self.rows(role, tensor.shape[0], tuple(tensor.shape[1:]), tensor.dtype, tensor.device)

    def rows(
        self, role: str, n: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The first ``n`` rows of ``role``'s buffer of rows shaped ``row_shape`` (allocated on first use)."""
        if n > self.max_tokens:
            raise ValueError(f"a piecewise step of {n} tokens exceeds the buffers' {self.max_tokens}")
        key = (role, row_shape, dtype)
        found = self._buffers.get(key)
        if found is None:
            found = torch.empty((self.max_tokens, *row_shape), dtype=dtype, device=device)
            self._buffers[key] = found
        return found[:n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


class PiecewiseCapture:
    """Captures one size's :class:`PiecewiseGraph` while the model runs over that size's dummy step.

    ``layers``: the model's paged attention layers, or an encoder's :class:`EncoderAttention` layers.
    ``new_graph`` makes an object with ``capture_begin(pool=...)``, ``capture_end()`` and ``replay()``
    (``torch.cuda.CUDAGraph``; tests pass a stand-in), captured into ``pool`` (the runner's shared one).
    """

    def __init__(
        self,
        layers: list[AttentionBackend[torch.Tensor]] | list[EncoderAttention],
        buffers: StaticAttentionBuffers,
        new_graph: Callable[[], Any],
        pool: object = None,
    ) -> None:
        self.layers = layers
        self.buffers = buffers
        self.new_graph = new_graph
        self.pool = pool
        self.graph = PiecewiseGraph()
        self._open: Any = None

    def run(self, forward: Callable[[], torch.Tensor]) -> PiecewiseGraph:
        """Run ``forward`` (the model over the size's step) cut at each attention call; return the graphs."""
        for layer in self.layers:  # instance attributes shadow the class's methods for this run only
            if isinstance(layer, EncoderAttention):
                layer.forward = partial(self._split_encoder, layer)  # type: ignore[method-assign]
                layer.packed_rows = partial(self._packed_rows, layer)  # type: ignore[method-assign]
            else:
                layer.forward = partial(self._split, layer)  # type: ignore[method-assign]
                layer.fuses_rotary = _never  # type: ignore[method-assign]
        try:
            self._begin()
            output = forward()
            self._end()
        except BaseException:
            if self._open is not None:  # leave no capture open on the stream
                with contextlib.suppress(Exception):  # the capture already failed: the driver ended it
                    self._open.capture_end()
                self._open = None
            raise
        finally:
            for layer in self.layers:
                for name in ("forward", "fuses_rotary", "packed_rows"):
                    layer.__dict__.pop(name, None)
        self.graph.output = output
        return self.graph

    def _begin(self) -> None:
        self._open = self.new_graph()
        self._open.capture_begin(pool=self.pool)

    def _end(self) -> None:
        self._open.capture_end()
        self.graph.segments.append(self._open)
        self._open = None

    def _split(
        self,
        layer: AttentionBackend[torch.Tensor],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata[torch.Tensor],
    ) -> torch.Tensor:
        buffers = self.buffers
        q = buffers.like("q", query)
        q.copy_(query)  # inside the open segment: each replay refills the buffers
        k = v = None
        if layer.splits_kv_write:
            slots = metadata.for_group(layer.kv_cache_group).slot_mapping  # a view of the persistent slot buffer
            layer.write_kv(key, value, kv_cache, slots)
        else:
            k, v = buffers.like("k", key), buffers.like("v", value)
            k.copy_(key)
            v.copy_(value)
        self._end()
        out = buffers.like("out", query)
        call = AttentionCall(layer, q, kv_cache, out, k, v)
        call.run(metadata)  # eagerly, as every replay will
        self.graph.calls.append(call)
        self._begin()
        return out

    def _split_encoder(
        self, layer: EncoderAttention, qkv: torch.Tensor, metadata: AttentionMetadata[torch.Tensor]
    ) -> torch.Tensor:
        packed = self._packed_rows(layer, qkv)
        if qkv.data_ptr() != packed.data_ptr() or qkv.shape != packed.shape:  # not written there by the model
            packed.copy_(qkv)  # inside the open segment
        self._end()
        out = self.buffers.like("out", qkv[:, : layer.num_heads * layer.head_dim])
        call = EncoderCall(layer, packed, out)
        call.run(metadata)
        self.graph.calls.append(call)
        self._begin()
        return out

    def _packed_rows(self, layer: EncoderAttention, like: torch.Tensor) -> torch.Tensor:
        """The static buffer ``layer``'s replayed attention call reads its q | k | v rows from."""
        width = 3 * layer.num_heads * layer.head_dim
        return self.buffers.rows("qkv", like.shape[0], (width,), like.dtype, like.device)


def _never(*args: Any) -> bool:
    return False
