"""An encoder (no paged attention) through CUDAModelRunner's pinned input path: no KV cache, no decode
graphs, steps padded to the piecewise sizes, and the generic runner's pooled vectors (on CPU here; on a GPU
the same path runs on the device, its padded steps replayed as piecewise graphs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from host_cuda_platform import HostCUDAPlatform
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.layers.bidirectional import EncoderAttention
from kvik.pooling import PoolingParams, PoolingType
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.testing.tiny_encoders import make_tiny_cross_encoder, make_tiny_encoder
from kvik.worker.kit import BlockTables
from kvik.worker.torch_runner import TorchModelRunner
from kvik_cuda.piecewise import PiecewiseCapture, StaticAttentionBuffers
from kvik_cuda.runner import CUDAModelRunner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

PROMPTS = {"a": list(range(2, 30)), "b": [2, 40, 41, 3], "c": list(range(50, 61))}


def _pooled(cls: type[TorchModelRunner], path: Path, manager, kind: PoolingType) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(path), dtype="float32", max_num_seqs=8, enforce_eager=False,
                       platform_options={"fused_layers": False})  # fmt: skip
    platform = HostCUDAPlatform()
    resolution = resolve_config(cfg, platform, manager)
    runner = cls(resolution.config, resolution.model_config, DEVICE, platform, manager)
    runner.load_model()
    assert not runner.keeps_kv_cache and runner.kv_block_bytes(16) == 1
    runner.initialize_kv_cache(32)
    assert runner.kv_caches == [] and not getattr(runner, "graphs", {})
    params = SamplingParams(max_tokens=1)
    pooling = PoolingParams(pooling_type=kind)
    step = [
        ScheduledRequest(rid, ids, 0, [1 + 2 * i, 2 + 2 * i], False, params, ids, pooling_params=pooling)
        for i, (rid, ids) in enumerate(PROMPTS.items())
    ]
    out = runner.execute(SchedulerOutput(step, sum(len(ids) for ids in PROMPTS.values())))
    assert out.pooled is not None
    return out.pooled


def test_cuda_runner_pools_an_encoder_like_the_generic_runner(kvik_plugin_manager, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = make_tiny_encoder(tmp_path / "bert", "bert", "mean")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in (PoolingType.MEAN, PoolingType.CLS):
            expected = _pooled(TorchModelRunner, path, kvik_plugin_manager, kind)
            got = _pooled(CUDAModelRunner, path, kvik_plugin_manager, kind)
            assert set(got) == set(PROMPTS)
            for rid in PROMPTS:
                torch.testing.assert_close(torch.tensor(got[rid]), torch.tensor(expected[rid]), rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_an_encoder_forward_never_waits_for_the_device(tmp_path: Path, monkeypatch, family: str) -> None:  # type: ignore[no-untyped-def]
    """A synchronizing call in the forward (a pageable host-to-device copy) would make the host wait for the
    step in flight, so the next step's host work could not overlap this one's kernels. BERT's token types and
    XLM-R's positions are computed per step from the request lengths."""
    import kvik

    path = make_tiny_cross_encoder(tmp_path / family, family, num_labels=1)
    llm = kvik.LLM(str(path), device="cuda", dtype="float32")
    runner = llm.llm_engine.runner
    forward = runner.run_model

    def strict(*args, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner, "run_model", strict)
    scores = llm.score("what is a cat", ["a cat is an animal", "the sky is blue"])  # pairs: [SEP]-split types
    assert len(scores) == 2 and all(np.isfinite(s.outputs.score) for s in scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["bert", "qwen3"])
def test_pooled_results_do_not_wait_for_the_next_step(tmp_path: Path, monkeypatch, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Under async scheduling the next step is launched before a step's results are read; the pooled
    vectors' copy must already be queued behind this step alone, not behind that next step."""
    import time

    import kvik
    from kvik.testing.tiny_pooling import make_tiny_embedder
    from kvik.worker.interface import StepHandle

    path = make_tiny_encoder(tmp_path / kind, kind, "mean") if kind == "bert" else make_tiny_embedder(tmp_path / kind)
    llm = kvik.LLM(str(path), device="cuda", dtype="float32")
    runner = llm.llm_engine.runner
    expected = llm.embed(["a cat is an animal", "the sky is blue"])
    inner = runner.sample
    waited: list[float] = []

    def sample_then_busy(*args, **kwargs):  # type: ignore[no-untyped-def]
        handle = inner(*args, **kwargs)
        torch.cuda._sleep(1 << 31)  # ~1 s of device work queued after the step, as the next step would be
        start = time.perf_counter()
        output = handle.result()
        waited.append(time.perf_counter() - start)
        return StepHandle.done(output)

    monkeypatch.setattr(runner, "sample", sample_then_busy)
    got = llm.embed(["a cat is an animal", "the sky is blue"])
    torch.cuda.synchronize()
    assert waited and max(waited) < 0.3, waited
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.outputs.embedding, b.outputs.embedding, rtol=1e-5, atol=1e-6)


class _Recorder:
    """A stand-in for torch.cuda.CUDAGraph: records the calls; ops between begin and end just run."""

    log: list[str] = []  # noqa: RUF012 (one log for the test that resets it)

    def capture_begin(self, pool: object = None) -> None:
        self.log.append("begin")

    def capture_end(self) -> None:
        self.log.append("end")

    def replay(self) -> None:
        self.log.append("replay")


def _runner(cls: type[TorchModelRunner], path: Path, manager) -> TorchModelRunner:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(path), dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                       enforce_eager=False, platform_options={"fused_layers": False})  # fmt: skip
    resolution = resolve_config(cfg, HostCUDAPlatform(), manager)
    runner = cls(resolution.config, resolution.model_config, DEVICE, HostCUDAPlatform(), manager)
    runner.load_model()
    runner.initialize_kv_cache(32)
    return runner


def _step(prompts: dict[str, list[int]]) -> list[ScheduledRequest]:
    pooling = PoolingParams(pooling_type=PoolingType.MEAN)
    return [
        ScheduledRequest(rid, ids, 0, [1 + i], False, SamplingParams(max_tokens=1), ids, pooling_params=pooling)
        for i, (rid, ids) in enumerate(prompts.items())
    ]


STEPS = [
    PROMPTS,  # 43 tokens -> 48: one padding request
    {"d": list(range(2, 18)), "e": list(range(20, 36))},  # 32: a size of its own, no padding
    {"f": [2, 7, 3]},  # 3 -> 16
    {"g": list(range(2, 14)), "h": list(range(30, 42)), "i": list(range(60, 72))},  # equal lengths, 36 -> 48
]


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "modernbert"])
def test_padded_encoder_steps_pool_the_generic_runners_vectors(kvik_plugin_manager, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    path = make_tiny_encoder(tmp_path / family, family, "mean")
    generic = _runner(TorchModelRunner, path, kvik_plugin_manager)
    runner = _runner(CUDAModelRunner, path, kvik_plugin_manager)
    assert isinstance(runner, CUDAModelRunner)
    assert runner.sizes == [] and runner.piecewise_sizes[:4] == [16, 32, 48, 64]
    assert runner.piece_layers and all(isinstance(m, EncoderAttention) for m in runner.piece_layers)
    padding = []
    for prompts in STEPS:
        step = _step(prompts)
        layout = runner.build_layout(step, runner.block_tables, runner.block_tables.apply(SchedulerOutput(step, 1)))
        padding.append((layout.num_tokens, layout.num_reqs - len(step)))
        tokens = sum(len(ids) for ids in prompts.values())
        expected = generic.execute(SchedulerOutput(_step(prompts), tokens)).pooled
        got = runner.execute(SchedulerOutput(_step(prompts), tokens)).pooled
        assert expected is not None and got is not None and set(got) == set(prompts)
        for rid in prompts:
            torch.testing.assert_close(torch.tensor(got[rid]), torch.tensor(expected[rid]), rtol=1e-5, atol=1e-6)
    assert padding == [(48, 1), (32, 0), (16, 1), (48, 1)]


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("family", ["bert", "modernbert"])  # modernbert: local layers attend in a window
def test_the_capture_cuts_an_encoder_at_every_attention_call(kvik_plugin_manager, tmp_path: Path, family: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = make_tiny_encoder(tmp_path / family, family, "mean")
    runner = _runner(CUDAModelRunner, path, kvik_plugin_manager)
    assert isinstance(runner, CUDAModelRunner) and runner.model is not None and runner.inputs is not None
    layers = runner.piece_layers
    step = _step(PROMPTS)
    tables = BlockTables()
    layout = runner.build_layout(step, tables, tables.apply(SchedulerOutput(step, 43)))
    prepared = runner.inputs.copy(layout)
    assert prepared.metadata.num_padding_reqs == 1

    def forward() -> torch.Tensor:
        return runner.model(prepared.input_ids, prepared.positions, [], prepared.metadata)  # type: ignore[misc]

    with torch.inference_mode():
        expected = forward().clone()
        _Recorder.log = []
        copied_into: list[int] = []  # data pointers of every copy_'s destination during the capture
        copy = torch.Tensor.copy_
        monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **k: copied_into.append(t.data_ptr()) or copy(t, *a, **k))
        graph = PiecewiseCapture(layers, StaticAttentionBuffers(runner.piecewise_sizes[-1]), _Recorder).run(forward)  # type: ignore[arg-type]
        monkeypatch.undo()
    assert _Recorder.log == ["begin", "end"] * (len(layers) + 1)
    assert len(graph.segments) == len(layers) + 1 and [c.layer for c in graph.calls] == layers
    assert all(not {"forward", "packed_rows"} & set(vars(layer)) for layer in layers)
    # Each layer's projection wrote its q | k | v rows straight into the buffer its attention call reads.
    assert {call.qkv.data_ptr() for call in graph.calls}.isdisjoint(copied_into)
    assert graph.output is not None and torch.equal(graph.output, expected)
    # The padding request's rows attend to nothing: zero in every attention output.
    assert all(not call.out[43:].any() for call in graph.calls)
    _Recorder.log = []
    with torch.inference_mode():
        again = graph.replay(prepared.metadata)
    assert _Recorder.log == ["replay"] * (len(layers) + 1) and again is graph.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "modernbert"])
def test_encoder_piecewise_graphs_give_the_eager_bits(tmp_path: Path, family: str) -> None:
    """An encoder's steps replayed as piecewise graphs: the same vectors as the same padded steps run eagerly
    (bit for bit), and as unpadded eager steps (to rounding)."""
    import kvik

    path = make_tiny_encoder(tmp_path / family, family, "mean")
    texts = [" ".join(["word"] * (1 + 2 * i)) + f" {i}" for i in range(13)]  # ragged; <= 105 tokens (XLM-R: 128)
    outs = {}
    for name, eager, limit in (("eager", True, None), ("graphs", False, None), ("unpadded", True, 0)):
        llm = kvik.LLM(str(path), device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=4,
                       platform_options={} if limit is None else {"piecewise_max_tokens": limit})  # fmt: skip
        runner = llm.llm_engine.runner
        assert isinstance(runner, CUDAModelRunner) and not runner.graphs
        assert bool(runner.piecewise_sizes) is (limit is None)
        assert bool(runner.piecewise_graphs) is (name == "graphs")
        outs[name] = np.array([o.outputs.embedding for o in llm.embed(texts)])
        if name == "graphs":
            assert runner.piecewise_replays > 0
        del llm
        torch.cuda.empty_cache()
    np.testing.assert_array_equal(outs["graphs"], outs["eager"])
    np.testing.assert_allclose(outs["unpadded"], outs["graphs"], rtol=1e-5, atol=1e-6)
