"""Piecewise CUDA graphs (kvik_cuda.piecewise): sizes, the forward cut at attention, padded mixed steps.

The graphs themselves need a GPU (tests/platforms/cuda/test_cuda_runner.py checks them against eager there).
On the CPU: the size ladder, the capture's cut (with a stand-in graph that records instead of capturing, the
model's own ops run as they would inside the segments), and the CUDA runner's padded prefill and mixed steps
against the generic runner.
"""

from __future__ import annotations

import itertools
import os
from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from host_cuda_platform import HostCUDAPlatform, register_small_tile_triton
from hypothesis import given
from hypothesis import strategies as st
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables
from kvik.worker.torch_runner import TorchModelRunner
from kvik_cuda.piecewise import (
    SMALLEST_SIZE,
    STEPS_PER_OCTAVE,
    PiecewiseCapture,
    StaticAttentionBuffers,
    default_max_tokens,
    piecewise_sizes,
)
from kvik_cuda.runner import CUDAModelRunner

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@given(st.integers(1, 70_000))
def test_sizes_climb_to_the_budget_padding_less_than_an_eighth(max_tokens: int) -> None:
    sizes = piecewise_sizes(max_tokens)
    assert sizes[-1] == max_tokens and sizes == sorted(set(sizes))
    assert all(s % SMALLEST_SIZE == 0 for s in sizes[:-1])
    for below, above in itertools.pairwise(sizes):
        if below >= STEPS_PER_OCTAVE * SMALLEST_SIZE:
            assert (above - below) / (below + 1) < 1 / STEPS_PER_OCTAVE  # a step of below + 1 tokens pads to above


def test_default_limit_covers_a_small_model_and_stops_early_for_an_8b() -> None:
    def shape(hidden: int, heads: int, kv: int, head_dim: int, inter: int) -> Any:
        hf = SimpleNamespace(intermediate_size=inter)
        return SimpleNamespace(hidden_size=hidden, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, hf_config=hf)

    assert default_max_tokens(shape(576, 9, 3, 64, 1536), 8192) == 8192  # SmolLM2: every step is launch-bound
    llama_8b = default_max_tokens(shape(4096, 32, 8, 128, 14336), 8192)
    assert 1024 <= llama_8b <= 2048  # past that its GPU work hides the eager launches
    assert default_max_tokens(shape(8192, 64, 8, 128, 28672), 8192) == 512  # the floor


class _Recorder:
    """A stand-in for torch.cuda.CUDAGraph: records the calls; ops between begin and end just run."""

    log: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.replays = 0

    def capture_begin(self, pool: object = None) -> None:
        self.log.append("begin")

    def capture_end(self) -> None:
        self.log.append("end")

    def replay(self) -> None:
        self.replays += 1
        self.log.append("replay")


def _needs_interpreted_triton() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU this needs TRITON_INTERPRET=1 before triton loads (tests/attention_backends set it)")


def _runner(manager: Any, path: Any, **config: Any) -> TorchModelRunner:
    cfg = EngineConfig(model=str(path), dtype="float32", block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                       **config)  # fmt: skip
    resolution = resolve_config(cfg, HostCUDAPlatform(), manager)
    runner_cls = CUDAModelRunner if config.get("attention_backend") else TorchModelRunner
    if "platform_options" in config:
        runner_cls = CUDAModelRunner
    runner = runner_cls(resolution.config, resolution.model_config, DEVICE, HostCUDAPlatform(), manager)
    runner.load_model()
    runner.initialize_kv_cache(32)
    return runner


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("backend", [None, "triton_interp"])  # triton_interp: K/V stored inside the segments
def test_the_capture_cuts_at_every_attention_call_and_changes_no_value(
    kvik_plugin_manager, tiny_model_dir, backend: str | None
) -> None:
    extra: dict[str, Any] = {}
    if backend is not None:
        _needs_interpreted_triton()
        register_small_tile_triton(kvik_plugin_manager, "piecewise_capture_plugin")
        extra["attention_backend"] = backend
    runner = _runner(kvik_plugin_manager, tiny_model_dir("qwen3"), platform_options={"fused_layers": False}, **extra)
    assert isinstance(runner, CUDAModelRunner) and runner.model is not None
    assert runner.attn_layers[0].splits_kv_write is (backend is not None)
    dummy = runner._piecewise_dummy(48)  # what capture runs: every token in the null block
    assert dummy.metadata.num_tokens == 48 and dummy.metadata.max_query_len > 1
    # Compared here on a step whose tokens have slots of their own (the dummy's share the null block's, and
    # on a GPU the order of their racing writes, hence what attention reads back, varies from run to run).
    reqs = [_req(f"r{i}", list(range(1 + 16 * i, 17 + 16 * i)), 0, list(range(1 + 4 * i, 5 + 4 * i))) for i in range(3)]
    tables = BlockTables()
    layout = runner._padded_layout(reqs, tables, tables.apply(SchedulerOutput(reqs, 48)), None)
    step = runner.inputs.copy(layout)  # type: ignore[union-attr]
    type(runner.attn_layers[0]).prepare(step.metadata)
    forward = partial(runner.model, step.input_ids, step.positions, runner.kv_caches, step.metadata)
    with torch.inference_mode():
        expected = forward().clone()
        _Recorder.log = []
        buffers = StaticAttentionBuffers(64)
        graph = PiecewiseCapture(runner.attn_layers, buffers, _Recorder).run(forward)
    layers = len(runner.attn_layers)
    assert _Recorder.log == ["begin", "end"] * (layers + 1)
    assert len(graph.segments) == layers + 1 and [c.layer for c in graph.calls] == runner.attn_layers
    assert graph.output is not None and torch.equal(graph.output, expected)
    assert all("forward" not in vars(layer) and "fuses_rotary" not in vars(layer) for layer in runner.attn_layers)
    # Every call reads and writes the shared static buffers (one set: all layers have one shape).
    assert all(c.query.data_ptr() == graph.calls[0].query.data_ptr() for c in graph.calls)
    assert buffers.nbytes() > 0
    _Recorder.log = []
    with torch.inference_mode():
        again = graph.replay(step.metadata)
    assert _Recorder.log == ["replay"] * (layers + 1) and again is graph.output


def test_a_failed_capture_ends_its_segment_and_restores_the_layers(kvik_plugin_manager, tiny_model_dir) -> None:
    runner = _runner(kvik_plugin_manager, tiny_model_dir("llama"), platform_options={"fused_layers": False})
    step = runner._piecewise_dummy(16)  # type: ignore[attr-defined]
    calls = []

    def forward() -> torch.Tensor:
        calls.append(1)
        runner.model(step.input_ids, step.positions, runner.kv_caches, step.metadata)  # type: ignore[misc]
        raise RuntimeError("operation not permitted when stream is capturing")

    _Recorder.log = []
    with torch.inference_mode(), pytest.raises(RuntimeError, match="capturing"):
        PiecewiseCapture(runner.attn_layers, StaticAttentionBuffers(16), _Recorder).run(forward)
    assert _Recorder.log[-1] == "end" and _Recorder.log.count("begin") == _Recorder.log.count("end")
    assert all("forward" not in vars(layer) for layer in runner.attn_layers)


def _req(rid: str, tokens: list[int], start: int, blocks: list[int], sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(rid, tokens, start, blocks, sample, SamplingParams(temperature=0.0))


MIXED = [
    [_req("a", list(range(3, 10)), 0, [1, 2]), _req("b", [5, 6, 7, 8, 9], 0, [3, 4])],  # 12 tokens -> 16
    [_req("a", [11], 7, [1, 2]), _req("c", list(range(20, 36)), 0, [6, 7, 9, 10])],  # 17 tokens -> 32
    [_req("c", [30], 16, [6, 7, 9, 10, 11]), _req("d", list(range(50, 81)), 0, [12, 13, 14, 15, 16, 17, 18, 19])],
    [_req("a", list(range(40, 44)), 8, [1, 2, 5], sample=False), _req("b", [32], 5, [3, 4])],  # 5 tokens -> 16
]


@pytest.mark.usefixtures("_one_thread")
def test_padded_prefill_and_mixed_steps_give_the_generic_runners_logits(kvik_plugin_manager, tiny_model_dir) -> None:
    _needs_interpreted_triton()
    register_small_tile_triton(kvik_plugin_manager, "piecewise_interp_plugin")
    path = tiny_model_dir("llama")

    def logits(runner: TorchModelRunner) -> list[torch.Tensor]:
        return [runner.compute_logits(SchedulerOutput(s, sum(len(r.token_ids) for r in s))) for s in MIXED]

    expected = logits(_runner(kvik_plugin_manager, path))
    runner = _runner(kvik_plugin_manager, path, attention_backend="triton_interp", platform_options={"fused_layers": False})
    assert isinstance(runner, CUDAModelRunner) and runner.piecewise_sizes == [16, 32, 48, 64]
    padded = []
    for s in MIXED:
        layout = runner.build_layout(s, runner.block_tables, runner.block_tables.apply(SchedulerOutput(s, 1)))
        padded.append((layout is runner._piecewise_layout, layout.num_tokens, layout.num_reqs - len(s)))
    # Each step pads to the next size with one absorber request; step 3 has 32 tokens already.
    assert padded == [(True, 16, 1), (True, 32, 1), (True, 32, 0), (True, 16, 1)]
    runner = _runner(kvik_plugin_manager, path, attention_backend="triton_interp", platform_options={"fused_layers": False})
    for e, g in zip(expected, logits(runner), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    off = _runner(kvik_plugin_manager, path, attention_backend="triton_interp",
                  platform_options={"fused_layers": False, "piecewise_max_tokens": 0})  # fmt: skip
    assert isinstance(off, CUDAModelRunner) and off.piecewise_sizes == []
