"""LLM.start_profile() / stop_profile(): a torch.profiler window per rank, a time-by-kernel summary, a Chrome trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvik import LLM, SamplingParams
from kvik.executor.profiling import TRACE_DIR_ENV
from kvik.testing.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = make_tiny_model(tmp_path_factory.mktemp("profile") / "llama", "llama")
    return LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, num_threads=1)


def test_a_profile_window_summarizes_the_steps_and_writes_a_trace(llm: LLM, tmp_path: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.start_profile()
    llm.generate(["Hello world", "Once upon a time"], params, use_tqdm=False)
    [summary] = llm.stop_profile(str(tmp_path))
    assert summary.rank == 0 and summary.wall_s > 0
    names = [k.name for k in summary.kernels]
    assert any(n.startswith("aten::") for n in names), names  # on the CPU the ops are the kernels
    assert summary.device_us == pytest.approx(sum(k.device_us for k in summary.kernels) + summary.other_device_us)
    assert all(a.device_us >= b.device_us for a, b in zip(summary.kernels, summary.kernels[1:], strict=False))
    assert 0 < summary.share("aten::") <= 1 and summary.share("no such kernel") == 0
    assert summary.trace_path == str(tmp_path / "rank0.json")
    assert json.loads(Path(summary.trace_path).read_text())["traceEvents"]


def test_the_trace_directory_comes_from_the_environment(llm: LLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path / "traces"))
    llm.start_profile()
    llm.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    [summary] = llm.stop_profile()
    assert Path(summary.trace_path or "") == tmp_path / "traces" / "rank0.json" and Path(summary.trace_path or "").exists()


def test_misuse_is_a_clear_error(llm: LLM) -> None:
    with pytest.raises(RuntimeError, match="no profile is running"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(RuntimeError, match="already running"):
        llm.start_profile()
    [summary] = llm.stop_profile()
    assert summary.trace_path is None  # no directory named anywhere: a summary only
    engine = llm.llm_engine
    engine.add_request("r", "Hello", SamplingParams(max_tokens=4))
    engine._in_flight.append(object())  # type: ignore[arg-type]  # as if a step were on the device
    try:
        with pytest.raises(RuntimeError, match="between steps"):
            llm.start_profile()
    finally:
        engine._in_flight.pop()
        engine.abort_request(["r"])
