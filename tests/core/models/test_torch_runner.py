"""TorchModelRunner behaviour beyond logits: sampling flags, seeded sampling, sizes, profiling."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kvik.config import EngineConfig
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.torch_runner import TorchModelRunner


@pytest.fixture
def runner(tiny_model_dir: Callable[..., Path], make_runner: Callable[..., TorchModelRunner]) -> TorchModelRunner:
    return make_runner(tiny_model_dir("llama"), num_blocks=64)


def step(req_id: str, tokens: list[int], start: int, blocks: list[int], params: SamplingParams, out: list[int]):
    return ScheduledRequest(req_id, tokens, start, blocks, True, params, [], out)


def test_only_requests_that_sample_get_tokens(runner: TorchModelRunner) -> None:
    chunk = ScheduledRequest("a", [1, 2, 3, 4, 5], 0, [3, 4], False, SamplingParams())
    full = ScheduledRequest("b", [6, 7], 0, [5], True, SamplingParams(temperature=0))
    out = runner.execute(SchedulerOutput([chunk, full], 7))
    assert set(out.sampled_token_ids) == {"b"}
    assert len(out.sampled_token_ids["b"]) == 1
    assert runner.execute(SchedulerOutput([], 0)).sampled_token_ids == {}


def test_seeded_request_repeats_its_tokens_in_any_batch(runner: TorchModelRunner) -> None:
    """Same seed: same tokens alone, beside other requests, and when recomputed after a 'preemption'."""
    prompt = [5, 9, 200, 17, 3, 44]
    seeded = SamplingParams(temperature=1.0, seed=42)

    def generate(with_neighbours: bool, recompute_at: int | None = None) -> list[int]:
        out: list[int] = []
        tokens = list(prompt)
        computed = 0
        while len(out) < 8:
            if recompute_at is not None and len(out) == recompute_at:
                computed, recompute_at = 0, None  # preempted: recompute everything, into other blocks
            blocks = [10, 11, 12, 13] if computed or len(out) < 4 else [20, 21, 22, 23]
            scheduled = [step("s", tokens[computed:], computed, blocks, seeded, out)]
            if with_neighbours:
                scheduled.insert(0, step("n1", [7] * (len(out) + 3), 0, [30, 31, 32], SamplingParams(), []))
                scheduled.append(step("n2", [8, 9], 0, [40], SamplingParams(temperature=0.7), []))
            result = runner.execute(SchedulerOutput(scheduled, sum(len(r.token_ids) for r in scheduled)))
            computed = len(tokens)
            out.append(result.sampled_token_ids["s"][0])
            tokens.append(out[-1])
        return out

    alone = generate(False)
    assert generate(True) == alone
    assert generate(False, recompute_at=4) == alone
    assert len(set(alone)) > 1


def test_sizes(runner: TorchModelRunner) -> None:
    mc = runner.model_config
    # K and V, every layer, block_size tokens of kv_heads x head_dim float32
    assert runner.kv_block_bytes(16) == 2 * mc.num_layers * 16 * mc.num_kv_heads * mc.head_dim * 4
    tensors = list(runner.model.parameters()) + list(runner.model.buffers())  # buffers: rotary inv_freq
    assert runner.weight_bytes() == sum(t.numel() for t in tensors) * 4
    assert len(runner.kv_caches) == mc.num_layers
    assert runner.kv_caches[0].shape == (2, 64, 4, mc.num_kv_heads, mc.head_dim)


def test_profile_estimates_without_allocator_stats_and_keeps_the_cache(runner: TorchModelRunner) -> None:
    runner.config = dataclasses.replace(runner.config, max_num_batched_tokens=600)  # longer than max_model_len (512): two dummy requests
    caches = runner.kv_caches
    activation = runner.profile()
    assert runner.kv_caches is caches
    assert activation >= 600 * runner.model_config.hidden_size * 4
    assert activation == runner.estimate_activation_bytes([512, 88])


def test_execute_before_setup_is_an_error(tiny_model_dir: Callable[..., Path], pm, test_platform) -> None:
    from kvik.engine.config_resolution import resolve_config

    path = str(tiny_model_dir("llama"))
    resolution = resolve_config(EngineConfig(model=path, block_size=4), test_platform, pm)
    runner = TorchModelRunner(resolution.config, resolution.model_config, torch.device("cpu"), test_platform, pm)
    req = SchedulerOutput([ScheduledRequest("a", [1], 0, [1], True, SamplingParams())], 1)
    with pytest.raises(RuntimeError, match="load_model"):
        runner.execute(req)
    runner.load_model()
    with pytest.raises(RuntimeError, match="initialize_kv_cache"):
        runner.execute(req)


def test_too_few_blocks_is_reported(runner: TorchModelRunner) -> None:
    req = ScheduledRequest("a", list(range(9)), 0, [1, 2], True, SamplingParams())
    with pytest.raises(ValueError, match="has 2 blocks for 9 tokens"):
        runner.execute(SchedulerOutput([req], 9))
