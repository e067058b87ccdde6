"""Conformance checks for model-architecture plugins.

Use in a plugin's tests, with a tiny random checkpoint of the architecture::

    from kvik.testing.conformance.model import check_model_architecture

    def test_conformance(kvik_plugin_manager, tmp_path):
        kvik_plugin_manager.register(my_plugin, "my_model", "kvik-my-model")
        check_model_architecture(write_tiny_checkpoint(tmp_path), kvik_plugin_manager, reference=my_reference)

The model is loaded by kvik's own loader and TorchModelRunner on the CPU with
the torch_ref attention backend, so the check covers registration, weight
loading and the paged-KV contract (chunked prefill, decode, batching).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kvik.config import EngineConfig
from kvik.engine.config_resolution import resolve_config
from kvik.models.interface import CausalLM
from kvik.plugins.manager import PluginManager, get_plugin_manager
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.testing.host_platform import HostCPUPlatform
from kvik.worker.torch_runner import TorchModelRunner

BLOCK_SIZE = 4  # small, so every prompt spans several blocks


class _Steps:
    """Runs steps on the runner, giving every new request its own blocks (block 0 is never used)."""

    def __init__(self, runner: TorchModelRunner) -> None:
        self.runner = runner
        self.next_block = 1
        self.blocks: dict[str, list[int]] = {}

    def run(self, chunks: list[tuple[str, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (request id, token ids, start position) -> per request [len(tokens), vocab] logits."""
        scheduled = []
        for rid, tokens, start in chunks:
            blocks = self.blocks.setdefault(rid, [])
            while len(blocks) * BLOCK_SIZE < start + len(tokens):
                blocks.append(self.next_block)
                self.next_block += 1
            scheduled.append(ScheduledRequest(rid, tokens, start, list(blocks), True, SamplingParams()))
        logits = self.runner.compute_logits(
            SchedulerOutput(scheduled, sum(len(t) for _, t, _ in chunks)), all_tokens=True
        )
        return list(logits.split([len(t) for _, t, _ in chunks]))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return float((a.float() - b.float()).abs().max()), float(b.float().abs().max()) or 1.0


def check_model_architecture(
    checkpoint: str | Path,
    manager: PluginManager | None = None,
    reference: Callable[[list[int]], torch.Tensor] | None = None,
    dtype: str = "float32",
    rtol: float = 1e-4,
    prompt_lengths: tuple[int, int] = (11, 6),
    seed: int = 0,
) -> None:
    """Load ``checkpoint`` through kvik and check the model plugin's contract; AssertionError lists problems.

    * the architecture is registered, its model is an ``nn.Module`` following
      :class:`kvik.models.interface.CausalLM`, and every parameter was loaded;
    * ``compute_logits`` gives float32 ``[n, vocab]``;
    * a prompt prefilled in uneven chunks, and one decoded token by token after a
      partial prefill, give the same logits as one whole prefill (the model reads
      back what it wrote to the paged KV cache, at the right positions);
    * two prompts batched in one step give the same logits as each alone;
    * with ``reference(token_ids) -> [T, vocab]`` (e.g. a plain-torch forward),
      the whole-prefill logits match it.

    Differences are measured as max |a - b| over the reference's max |logit|,
    against ``rtol``.
    """
    manager = manager or get_plugin_manager()
    platform = HostCPUPlatform()
    resolution = resolve_config(EngineConfig(model=str(checkpoint), dtype=dtype, block_size=BLOCK_SIZE), platform, manager)
    config, model_config = resolution.config, resolution.model_config
    runner = TorchModelRunner(config, model_config, torch.device("cpu"), platform, manager)
    runner.load_model()
    runner.initialize_kv_cache(64)
    model = runner.model
    problems: list[str] = []
    if not isinstance(model, nn.Module) or not isinstance(model, CausalLM):
        problems.append(f"{type(model).__name__} must be an nn.Module with forward, compute_logits, load_weights")
    missing: list[str] = getattr(model, "missing_weights", list)()
    if missing:
        problems.append(f"parameters the checkpoint did not fill: {', '.join(missing[:10])}")
    if problems:
        raise AssertionError(f"model {model_config.architecture} does not conform:\n  - " + "\n  - ".join(problems))

    rng = random.Random(seed)
    vocab = model_config.vocab_size
    first, second = ([rng.randrange(3, vocab) for _ in range(n)] for n in prompt_lengths)

    def compare(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if got.shape != want.shape:
            problems.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            return
        diff, scale = _max_diff(got, want)
        if diff > rtol * scale:
            problems.append(f"{what}: max |diff| {diff:.3g} exceeds {rtol} x {scale:.3g}")

    steps = _Steps(runner)
    (whole,) = steps.run([("whole", first, 0)])
    if whole.dtype != torch.float32 or tuple(whole.shape) != (len(first), vocab):
        problems.append(
            f"compute_logits gave {whole.dtype} {tuple(whole.shape)}, expected float32 {(len(first), vocab)}"
        )
    if reference is not None:
        compare("whole prefill vs reference", whole, reference(first))
    cuts = [0, 4, 7, len(first)]  # chunks of 4, 3 and the rest, each a separate step
    chunked = [steps.run([("chunked", first[a:b], a)])[0] for a, b in itertools.pairwise(cuts)]
    compare("chunked prefill vs whole prefill", torch.cat(chunked), whole)
    split = len(first) - 3
    decoded = [steps.run([("decode", first[:split], 0)])[0]]
    decoded += [steps.run([("decode", [first[p]], p)])[0] for p in range(split, len(first))]
    compare("prefill + decode vs whole prefill", torch.cat(decoded), whole)
    (alone,) = steps.run([("alone", second, 0)])
    batched_first, batched_second = steps.run([("b1", first, 0), ("b2", second, 0)])
    compare("batched first prompt vs alone", batched_first, whole)
    compare("batched second prompt vs alone", batched_second, alone)
    if problems:
        raise AssertionError(f"model {model_config.architecture} does not conform:\n  - " + "\n  - ".join(problems))
