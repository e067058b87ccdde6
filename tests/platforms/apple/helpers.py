"""Building an MLX runner from a checkpoint and driving it with hand-made SchedulerOutputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.plugins.manager import get_plugin_manager
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik_apple.platform import ApplePlatform
from kvik_apple.runner import MLXModelRunner


def make_runner(path: str | Path, num_blocks: int = 64, **options: Any) -> MLXModelRunner:
    config = EngineConfig(model=str(path), device="apple", dtype=options.pop("dtype", "float32"), **options)
    platform = ApplePlatform()
    resolution = resolve_config(config, platform, get_plugin_manager())
    runner = platform.create_model_runner(resolution.config, resolution.model_config)
    assert isinstance(runner, MLXModelRunner)
    runner.load_model()
    runner.initialize_kv_cache(num_blocks)
    return runner


def run_greedy(
    runner: MLXModelRunner,
    prompts: list[list[int]],
    block_ids: list[list[int]],
    new_tokens: int,
    chunk: int | None = None,
    params: SamplingParams | None = None,
) -> list[list[int]]:
    """Generate ``new_tokens`` per prompt as a scheduler would: all requests each step, prefill in
    ``chunk``-token pieces, with the block tables given (enough blocks for prompt + new tokens)."""
    params = params or SamplingParams(temperature=0.0, max_tokens=new_tokens)
    computed = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    while any(len(o) < new_tokens for o in outputs):
        scheduled = []
        for i, prompt in enumerate(prompts):
            if len(outputs[i]) >= new_tokens:
                continue
            tokens = prompt + outputs[i]
            n = len(tokens) - computed[i]
            if chunk is not None:
                n = min(n, chunk)
            sample = computed[i] + n == len(tokens)
            scheduled.append(
                ScheduledRequest(
                    str(i),
                    tokens[computed[i] : computed[i] + n],
                    computed[i],
                    block_ids[i],
                    sample,
                    params,
                    prompt,
                    outputs[i],
                )
            )
        result = runner.execute(SchedulerOutput(scheduled, sum(s.num_new_tokens for s in scheduled)))
        for s in scheduled:
            i = int(s.request_id)
            computed[i] += s.num_new_tokens
            if s.sample:
                outputs[i].extend(result.sampled_token_ids[s.request_id])
    return outputs
