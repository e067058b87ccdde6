"""The ONNX Runtime runner (``platform_options={"onnx_model": ...}``): kvik's engine around an exported graph.

References: kvik's own torch path on the same fp32 weights (an fp32 export decodes token for token
like it, tests/core/entrypoints/test_export_onnx.py), and ONNX Runtime GenAI's own generator on the
same export (the runner must not change what the graph computes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai", reason="the onnx extra (pip install 'kvik[onnx]') is not installed")

import kvik

PROMPTS = [[5, 9, 33, 2, 17], list(range(40, 77)), [101, 7, 7, 7, 250, 31, 8, 64, 12]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama checkpoint and its fp32 export."""
    from kvik.entrypoints.export_onnx import export_onnx
    from kvik.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("onnx_runner")
    model = make_tiny_model(root / "llama", "llama")
    export_onnx(str(model), root / "onnx", precision="fp32", verify=False)
    return model, root / "onnx"


def _llm(model: Path, onnx: Path | None, **kwargs: object) -> kvik.LLM:
    options = {"onnx_model": str(onnx)} if onnx is not None else {}
    defaults: dict[str, object] = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                                       platform_options=options)  # fmt: skip
    return kvik.LLM(str(model), **{**defaults, **kwargs})


def _greedy(llm: kvik.LLM, prompts: list[list[int]], n: int = 16, **params: object) -> list[kvik.RequestOutput]:
    sampling = kvik.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **params)
    return llm.generate(prompts, sampling, use_tqdm=False)


def test_greedy_tokens_and_logprobs_match_kvik_torch(exported: tuple[Path, Path]) -> None:
    model, onnx = exported
    torch_out = _greedy(_llm(model, None), PROMPTS, logprobs=3)
    llm = _llm(model, onnx)
    assert not llm.llm_engine.scheduler.kv_cache.enable_prefix_caching  # the runner keeps K/V per request
    onnx_out = _greedy(llm, PROMPTS, logprobs=3)
    for ours, theirs in zip(torch_out, onnx_out, strict=True):
        assert theirs.outputs[0].token_ids == ours.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            assert np.allclose([a[t].logprob for t in a], [b[t].logprob for t in a], atol=1e-4)


def test_chunked_prefill_batching_and_repeats_give_the_same_tokens(exported: tuple[Path, Path]) -> None:
    """Prompts prefilled in 8-token chunks, up to three requests decoding as one batch (joining and leaving
    it), the same prompt twice (no prefix hits): every request's tokens are those it gets alone."""
    model, onnx = exported
    alone = [_greedy(_llm(model, onnx), [p])[0].outputs[0].token_ids for p in PROMPTS]
    llm = _llm(model, onnx, max_num_batched_tokens=8, enable_chunked_prefill=True, max_num_seqs=3)
    params = [kvik.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (16, 16, 9, 16)]
    together = [o.outputs[0].token_ids for o in llm.generate([*PROMPTS, PROMPTS[1]], params, use_tqdm=False)]
    assert together == [*alone[:2], alone[2][:9], alone[1]]
    # Finished requests leave no K/V behind (their ids reach the runner with the next step).
    _greedy(llm, [PROMPTS[0]], n=2)
    runner = llm.llm_engine.runner
    assert len(runner._sequences) + sum(len(set(b.ids) - b.dead) for b in runner._batches) <= 1


def test_unlike_lengths_decode_as_separate_batches(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long request decoding beside short ones runs apart (its length would pad every short row); each
    request's tokens are still those it gets alone."""
    from kvik_cpu import onnx_runner

    model, onnx = exported
    prompts = [list(range(3, 123)), PROMPTS[0], PROMPTS[2], [7, 8, 9, 10, 11, 12]]
    alone = [_greedy(_llm(model, onnx), [p])[0].outputs[0].token_ids for p in prompts]
    monkeypatch.setattr(onnx_runner, "PADDING_SLACK", 0)
    llm = _llm(model, onnx, max_num_seqs=4)
    sizes: list[list[int]] = []
    runner = llm.llm_engine.runner
    arrange = runner._arrange
    monkeypatch.setattr(runner, "_arrange", lambda groups: sizes.append([len(g) for g in groups]) or arrange(groups))
    together = [o.outputs[0].token_ids for o in _greedy(llm, prompts)]
    assert together == alone
    assert [3] in sizes  # the three short requests as one batch; the 120-token one alone
    assert onnx_runner.decode_groups([120, 5, 37, 9]) == [[0], [2], [1, 3]]
    assert onnx_runner.decode_groups([40, 41, 39]) == [[0, 1, 2]]


def test_tokens_match_onnxruntime_genai_on_an_int4_export(tmp_path: Path) -> None:
    """int4 MatMulNBits with int8 activations (the fast path): the runner decodes exactly what ONNX Runtime
    GenAI's own generator decodes from the same folder."""
    from kvik.entrypoints.export_onnx import export_onnx, onnx_greedy
    from kvik.testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", "llama")
    export_onnx(str(model), tmp_path / "int4", precision="int4", verify=False,
                builder_options={"int4_accuracy_level": "4"})  # fmt: skip
    ours = [o.outputs[0].token_ids for o in _greedy(_llm(model, tmp_path / "int4"), PROMPTS)]
    assert ours == onnx_greedy(tmp_path / "int4", PROMPTS, 16)


def test_auto_exports_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvik.entrypoints import export_onnx as export_module
    from kvik.testing.tiny_models import make_tiny_model

    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path / "llama", "llama")
    calls = []
    real = export_module.export_onnx
    monkeypatch.setattr(export_module, "export_onnx", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = _greedy(_llm(model, None, platform_options={"onnx_model": "auto"}), PROMPTS[:1])
    second = _greedy(_llm(model, None, platform_options={"onnx_model": "auto"}), PROMPTS[:1])
    assert len(calls) == 1  # the second engine found the export in the cache
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    assert first[0].outputs[0].token_ids == _greedy(_llm(model, None), PROMPTS[:1])[0].outputs[0].token_ids
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1


def test_misuse_is_a_clear_error(exported: tuple[Path, Path], tmp_path: Path) -> None:
    from kvik.testing.tiny_models import make_tiny_model

    model, onnx = exported
    with pytest.raises(ValueError, match="not an ONNX Runtime GenAI model folder"):
        _llm(model, tmp_path)
    with pytest.raises(ValueError, match=r"cannot combine with kv_cache_dtype=.fp8., enable_lora"):
        _llm(model, onnx, enable_lora=True, kv_cache_dtype="fp8")
    other = make_tiny_model(tmp_path / "other", "llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"has \(layers, kv heads, head size\) \(2, "):
        _llm(other, onnx)


def test_a_request_resumed_without_its_kv_fails_loudly(exported: tuple[Path, Path]) -> None:
    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

    model, onnx = exported
    runner = _llm(model, onnx).llm_engine.runner
    params = kvik.SamplingParams(temperature=0.0)
    step = SchedulerOutput([ScheduledRequest("r", [1, 2, 3], 0, [1], True, params)], 3)
    runner.execute(step)
    with pytest.raises(RuntimeError, match="resumes at position 5, but the ONNX Runtime runner holds 3"):
        runner.execute(SchedulerOutput([ScheduledRequest("r", [4], 5, [], True, params, full_block_table=False)], 1))
    with pytest.raises(RuntimeError, match="holds no K/V for it"):
        runner.execute(SchedulerOutput([ScheduledRequest("s", [4], 2, [2], True, params)], 1))


def test_an_aborted_request_leaves_the_batch_and_the_others_keep_their_tokens(exported: tuple[Path, Path]) -> None:
    model, onnx = exported
    alone = _greedy(_llm(model, onnx), [PROMPTS[0]], n=24)[0].outputs[0].token_ids
    engine = _llm(model, onnx, max_num_seqs=3).llm_engine
    params = kvik.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {}
    for step in range(40):
        if step == 6:
            engine.abort_request("r1")  # mid-decode, while it sits in the decode batch
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    runner = engine.runner
    assert "r1" not in runner._sequences and all("r1" not in set(b.ids) - b.dead for b in runner._batches)
    assert tokens["r0"] == alone
