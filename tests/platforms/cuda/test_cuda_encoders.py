"""An encoder (no paged attention) through CUDAModelRunner's pinned input path: no KV cache, no graphs,
and the generic runner's pooled vectors (on CPU here; on a GPU the same path runs on the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from host_cuda_platform import HostCUDAPlatform
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.pooling import PoolingParams, PoolingType
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.testing.tiny_encoders import make_tiny_cross_encoder, make_tiny_encoder
from kvik.worker.torch_runner import TorchModelRunner
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
