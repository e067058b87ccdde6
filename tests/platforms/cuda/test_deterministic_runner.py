"""deterministic=True through the CUDA runner: the Triton GEMM, fused layers, Triton attention, bucketed decode.

On CPU the runner runs on the host-cuda test platform with every kernel under Triton's interpreter
(float32: the interpreter's bf16 dot is broken). A target request runs alone (whole prefill, then
decodes), then again under another id inside batches: its prompt split into chunks, its decodes in
mixed steps and in decode-only steps padded to a bucket, at different places. Its logits must be
bit-identical.
"""

from __future__ import annotations

import os

import pytest
import torch
from host_cuda_platform import HostCUDAPlatform, register_small_tile_triton
from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

pytest.importorskip("triton", reason="triton is not installed")

from kvik.layers.batch_invariant import InvariantLinearMethod
from kvik_cuda.batch_invariant import InvariantFusedRMSNorm
from kvik_cuda.runner import CUDAModelRunner

pytestmark = pytest.mark.usefixtures("row_by_row_interpreted_dot")  # tests/conftest.py says why
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPT = [7, 99, 23, 410, 5, 61, 300, 12, 88, 9, 150, 42, 17]  # 13 tokens
DECODES = [101, 102, 103]


def _req(rid: str, tokens: list[int], start: int, blocks: list[int], sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(rid, tokens, start, blocks, sample, SamplingParams(temperature=0.0))


def _runner(manager, path) -> CUDAModelRunner:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(path), dtype="float32", block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                       attention_backend="triton_interp", platform_options={"fused_layers": True}, deterministic=True)  # fmt: skip
    platform = HostCUDAPlatform()
    resolution = resolve_config(cfg, platform, manager)
    runner = CUDAModelRunner(resolution.config, resolution.model_config, DEVICE, platform, manager)
    runner.load_model()
    runner.initialize_kv_cache(40)
    return runner


def _row(runner: CUDAModelRunner, step: list[ScheduledRequest], rid: str) -> torch.Tensor:
    logits = runner.compute_logits(SchedulerOutput(step, sum(len(r.token_ids) for r in step)))
    sampled = [r.request_id for r in step if r.sample]
    return logits[sampled.index(rid)]


def test_target_logits_alone_equal_in_chunked_mixed_and_bucketed_steps(kvik_plugin_manager, tiny_model_dir) -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU this needs TRITON_INTERPRET=1 before triton loads (tests/conftest.py sets it)")
    register_small_tile_triton(kvik_plugin_manager, "interp_plugin_det")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = _runner(kvik_plugin_manager, tiny_model_dir("llama"))
        modules = list(runner.model.modules())
        assert any(isinstance(m, InvariantFusedRMSNorm) for m in modules)
        assert all(isinstance(m.quant_method, InvariantLinearMethod) for m in modules if hasattr(m, "quant_method"))
        t = [1, 2, 3, 4]
        alone = [_row(runner, [_req("a", PROMPT, 0, t)], "a")]
        for i, tok in enumerate(DECODES):
            alone.append(_row(runner, [_req("a", [tok], 13 + i, t)], "a"))

        b, n1, n2, n3 = [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15], [16, 17, 18]
        got = []
        # The prompt in two chunks, next to a neighbour's prefill.
        _row(runner, [_req("n1", list(range(30, 39)), 0, n1), _req("b", PROMPT[:6], 0, b, sample=False)], "n1")
        step = [_req("n1", [40], 9, n1), _req("n2", list(range(50, 55)), 0, n2), _req("b", PROMPT[6:], 6, b)]
        got.append(_row(runner, step, "b"))
        # A decode-only step of three, padded to the bucket of four.
        step = [_req("n2", [56], 5, n2), _req("b", [DECODES[0]], 13, b), _req("n1", [41], 10, n1)]
        assert runner._bucket(step) == (4, 4)
        got.append(_row(runner, step, "b"))
        # A decode inside a mixed step (a neighbour's prefill first).
        got.append(_row(runner, [_req("n3", list(range(60, 67)), 0, n3), _req("b", [DECODES[1]], 14, b)], "b"))
        # A decode-only step of two, the target first.
        got.append(_row(runner, [_req("b", [DECODES[2]], 15, b), _req("n1", [42], 11, n1)], "b"))
        for i, (a, g) in enumerate(zip(alone, got, strict=True)):
            assert torch.equal(a, g), f"row {i}"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_engine_on_a_gpu_alone_and_in_batches(tiny_model_dir) -> None:
    """bf16, CUDA graphs on, prefix caching and chunked prefill: one prompt alone vs batches of 1-40."""
    import random

    import kvik
    from kvik.testing.reference import random_prompts

    llm = kvik.LLM(str(tiny_model_dir("llama", dtype="bfloat16")), device="cuda", dtype="bfloat16", deterministic=True,
                   max_num_seqs=64, num_kv_blocks=512, block_size=16, max_num_batched_tokens=64)  # fmt: skip
    target = random_prompts(1, seed=3, low=90, high=91)[0]
    params = kvik.SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, ignore_eos=True)

    def signature(out):  # type: ignore[no-untyped-def]
        c = out.outputs[0]
        return c.token_ids, [sorted((t, lp.logprob) for t, lp in e.items()) for e in c.logprobs]

    alone = signature(llm.generate([target], params, use_tqdm=False)[0])
    rng = random.Random(0)
    for size in (1, 2, 5, 17, 40):
        others = random_prompts(size - 1, seed=size, low=3, high=200)
        place = rng.randrange(size)
        outs = llm.generate([*others[:place], target, *others[place:]], params, use_tqdm=False)
        assert signature(outs[place]) == alone, f"batch of {size}, target at {place}"
