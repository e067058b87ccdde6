"""Speculative verify steps bucketed to (requests, tokens) shapes and, on a GPU, replayed as CUDA graphs.

On the CPU the CUDA runner (host CUDA platform) pads verify steps exactly as it would for its
graphs (for every method; EAGLE-3 runs its target eagerly and pads nothing), through the Triton kernels under the interpreter with small tiles: greedy output
must equal the output without speculation. On a GPU (``-m gpu``) the same runs with CUDA
graphs, and the verify steps must replay a captured graph.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import host_cuda_platform
import pytest
import torch
from host_cuda_platform import HostCUDAPlatform, register_small_tile_triton
from kvik import LLM, SamplingParams
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.scheduling.output import ScheduledRequest
from kvik_cuda.runner import MAX_VERIFY_BATCH, CUDAModelRunner, GraphShape, capture_sizes, verify_shapes

CUDA = torch.cuda.is_available()
K = 3

_spec = importlib.util.spec_from_file_location(
    "kvik_eagle_heads_verify", Path(__file__).parents[2] / "core" / "spec_decode" / "test_eagle.py"
)
heads = importlib.util.module_from_spec(_spec)  # the EAGLE head writer of the core tests
_spec.loader.exec_module(heads)  # type: ignore[union-attr]


def _interpreted() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU this needs TRITON_INTERPRET=1 before triton loads")


def _req(rid: str, n: int, drafts: int = 0, sample: bool = True) -> ScheduledRequest:
    tokens = list(range(1, n + 1))
    return ScheduledRequest(
        rid, tokens, 5, [1, 2], sample, SamplingParams(temperature=0), draft_token_ids=tokens[n - drafts :]
    )


def test_verify_shapes_cover_every_size_that_fits() -> None:
    sizes = capture_sizes(256, 8192)
    shapes = verify_shapes(sizes, 5, 8192, 4096)
    assert shapes[0] == (2, 6) and shapes[-1] == (MAX_VERIFY_BATCH + 1, 5 * MAX_VERIFY_BATCH + 1)
    assert [g.num_reqs - 1 for g in shapes] == [s for s in sizes if s <= MAX_VERIFY_BATCH]
    # The step budget and max_model_len (the absorber's context is its own tokens) bound them.
    assert verify_shapes(sizes, 5, 40, 4096) == [(2, 6), (3, 11), (5, 21)]
    assert verify_shapes(sizes, 5, 8192, 30) == [(2, 6), (3, 11), (5, 21)]


@pytest.mark.usefixtures("_one_thread")
def test_bucket_picks_the_smallest_shape_that_holds_the_step(kvik_plugin_manager, tiny_model_dir) -> None:
    _interpreted()
    register_small_tile_triton(kvik_plugin_manager, "interp_verify")
    path = tiny_model_dir("llama")
    spec = {"method": "ngram", "num_speculative_tokens": K}
    runner = _runner(path, kvik_plugin_manager, speculative_config=spec)
    assert runner.verify_tokens_per_request == K + 1 and runner.sizes == [1, 2, 4, 8]
    assert runner.verify_shapes == [(2, 5), (3, 9), (5, 17), (9, 33)]
    bucket = runner._bucket
    assert bucket([_req("a", 1), _req("b", 1), _req("c", 1)]) == (4, 4)  # decode-only: as before
    assert bucket([_req("a", 4, 3)]) == (2, 5)
    assert bucket([_req("a", 2, 1), _req("b", 1)]) == (3, 9)  # a request without drafts rides along
    assert bucket([_req("a", 4, 3), _req("b", 4, 3), _req("c", 1)]) == (5, 17)
    assert bucket([_req(f"r{i}", 4, 3) for i in range(8)]) == (9, 33)  # exactly full: absorber of one
    assert bucket([_req(f"r{i}", 2, 1) for i in range(9)]) is None  # more requests than the largest size
    assert bucket([_req("a", 5, 4)]) is None  # longer than k + 1: a prefill chunk
    assert bucket([_req("a", 4, 3), _req("b", 3, sample=False)]) is None  # a non-sampling chunk
    plain = _runner(path, kvik_plugin_manager)
    assert plain.verify_shapes == [] and plain._bucket([_req("a", 4, 3)]) is None
    # What graph capture runs: a dummy step of every shape fits the step buffers and the model runs on it.
    for shape in [GraphShape(s, s) for s in runner.sizes] + runner.verify_shapes:
        step = runner.copy_dummy_step(shape)
        m = step.metadata
        assert (m.num_reqs, m.num_tokens, m.is_decode_only) == (*shape, shape.num_reqs == shape.num_tokens)
        assert m.block_tables.shape[0] == shape.num_reqs and not m.slot_mapping.any()
    if CUDA:  # this runner's tensors live on the host, which compiled Triton cannot read (the GPU test runs it)
        return
    with torch.inference_mode():
        hidden = runner.model(step.input_ids, step.positions, runner.kv_caches, step.metadata)  # type: ignore[misc]
    assert hidden.shape[0] == runner.verify_shapes[-1].num_tokens and torch.isfinite(hidden).all()


def _runner(path, manager, **config) -> CUDAModelRunner:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(path), dtype="float32", block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                       max_model_len=96, attention_backend="triton_interp", **config)  # fmt: skip
    platform = HostCUDAPlatform()
    resolution = resolve_config(cfg, platform, manager)
    runner = CUDAModelRunner(resolution.config, resolution.model_config, torch.device("cpu"), platform, manager)
    runner.load_model()
    runner.initialize_kv_cache(64)
    return runner


def _record(runner: CUDAModelRunner) -> list[tuple[GraphShape | None, bool]]:
    """Per step the runner runs from now on: its bucket and whether a graph replayed."""
    shapes: list[tuple[GraphShape | None, bool]] = []
    run_model = runner.run_model

    def recording(inputs):  # type: ignore[no-untyped-def]
        before = runner.replays
        out = run_model(inputs)
        shapes.append((getattr(inputs, "bucket", None), runner.replays > before))
        return out

    runner.run_model = recording  # type: ignore[method-assign]
    return shapes


def _verify_steps(runner: CUDAModelRunner, steps: list[tuple[GraphShape | None, bool]]) -> list[bool]:
    """Whether each verify-bucketed step replayed a graph (and that its bucket is one of the runner's)."""
    verify = [(s, replayed) for s, replayed in steps if s is not None and s.num_tokens != s.num_reqs]
    assert all(s in runner.verify_shapes for s, _ in verify), steps
    return [replayed for _, replayed in verify]


def _generate(target, device: str, spec: dict | None) -> tuple[list[list[int]], LLM, dict[str, list]]:  # type: ignore[no-untyped-def]
    """Greedy outputs, the engine, and the target's (and a draft runner's) steps as :func:`_record` keeps them."""
    llm = LLM(str(target), device=device, dtype="float32", block_size=16, max_model_len=96, max_num_seqs=4,
              max_num_batched_tokens=48, num_kv_blocks=48, attention_backend="triton_interp",
              speculative_config=spec)  # fmt: skip
    runner = llm.llm_engine.runner
    assert isinstance(runner, CUDAModelRunner)
    steps = {"target": _record(runner)}
    draft = getattr(runner.drafter, "draft", None)
    if draft is not None:
        steps["draft"] = _record(draft)
    # Prompts that repeat themselves, so prompt lookup finds drafts from the first decode on.
    prompts = [{"prompt_token_ids": [7 + i, 20 + i, 33, 41 + i] * (2 + i)} for i in range(3)]
    out = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out], llm, steps


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle", "eagle3"])
def test_padded_verify_steps_keep_greedy_output(kvik_plugin_manager, tiny_model_dir, tmp_path, method) -> None:
    _interpreted()
    import kvik_cuda.plugin

    assert kvik_plugin_manager.register(host_cuda_platform, "host-cuda", "tests")
    register_small_tile_triton(kvik_plugin_manager, "interp_verify")
    device = "cuda" if CUDA else "host-cuda"
    if CUDA:
        assert kvik_plugin_manager.register(kvik_cuda.plugin, "cuda", "kvik-cuda")
    target = tiny_model_dir("llama", num_hidden_layers=2)
    spec = {"method": method, "num_speculative_tokens": K}
    if method == "draft_model":
        spec["model"] = str(target)  # the target as its own draft: everything accepted
    elif method.startswith("eagle"):
        spec["model"] = str(heads.write_head(tmp_path / "head", method))
    else:
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    want, _, _ = _generate(target, device, None)
    got, llm, steps = _generate(target, device, spec)
    assert got == want
    runner = llm.llm_engine.runner
    stats = llm.llm_engine.get_stats()
    assert stats.spec_draft_tokens > 0
    runners = {"target": runner}
    if method == "eagle3":  # the target runs eagerly (its layers' inputs feed the head): nothing padded
        assert runner.verify_shapes == [] and not runner.graphs
        assert all(s is None or s.num_reqs == s.num_tokens for s, _ in steps["target"])
        return
    if method == "eagle":  # the head's one-token draft passes: a graph per decode size, on the GPU
        assert runner.drafter is not None and runner.drafter.has_decode_pass
        want_draft = {GraphShape(s, s) for s in runner.sizes} if CUDA else set()
        assert set(runner.draft_graphs) == want_draft
    if method == "draft_model":
        # The draft's own runner: its catch-up step (up to k accepted drafts and the bonus token
        # per request) is verify-shaped with k + 2 tokens per request; its one-token draft steps
        # are decode buckets.
        draft = runner.drafter.draft  # type: ignore[union-attr]
        assert isinstance(draft, CUDAModelRunner) and draft.verify_tokens_per_request == K + 2
        assert draft.verify_shapes == [(2, 6), (3, 11), (5, 21)]
        runners["draft"] = draft
    for name, r in runners.items():
        replayed = _verify_steps(r, steps[name])
        assert replayed, f"the {name} runner ran no verify-shaped step"
        if CUDA:  # graphs captured for every verify shape, and every verify step replayed one
            assert all(s in r.graphs for s in r.verify_shapes)
            assert all(replayed), (name, steps[name])
        else:
            assert not r.graphs and r.replays == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_graphs_give_the_eager_tokens(tiny_model_dir, dtype: str) -> None:
    """The real Triton backend: verify graphs on and off (enforce_eager runs the same padded shapes)
    give the same tokens, and with graphs every verify-shaped step replays one."""
    path = tiny_model_dir("llama", num_hidden_layers=2)
    prompts = [{"prompt_token_ids": [3 + i, 50 + 7 * i, 9, 120 + i, 77] * (2 + i % 3)} for i in range(12)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    outs = {}
    for eager in (True, False):
        llm = LLM(model=str(path), device="cuda", dtype=dtype, enforce_eager=eager, max_num_seqs=16,
                  num_kv_blocks=256, speculative_config=spec)  # fmt: skip
        runner = llm.llm_engine.runner
        assert isinstance(runner, CUDAModelRunner) and runner.verify_shapes
        assert all((s in runner.graphs) is (not eager) for s in runner.verify_shapes)
        steps = _record(runner)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        replayed = _verify_steps(runner, steps)
        assert replayed and all(r is (not eager) for r in replayed)
        assert llm.llm_engine.get_stats().spec_draft_tokens > 0
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
