"""deterministic=True through the engine: one request's logprobs and tokens are bit-identical alone or in any batch.

The torch CPU path (blocked linears, fixed-piece transcendentals, the torch_ref backend's invariant
attention) with prefix caching and chunked prefill on, and a small token budget so that prompts are
split into chunks at places that move with the neighbours. The target request runs alone, then in
batches of 1..8 with random neighbours at every kind of position; some neighbours share its prefix
(prefix-cache hits), later runs find its own blocks cached. Logprobs are compared as floats: every bit.
"""

from __future__ import annotations

import random

import pytest
from kvik import LLM, SamplingParams
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.layers.batch_invariant import InvariantLinearMethod, InvariantRMSNorm
from kvik.layers.norm import RMSNorm
from kvik.quantization.unquantized import UnquantizedLinearMethod
from kvik.testing.reference import random_prompts

OPTIONS = dict(device="cpu", num_threads=1, num_kv_blocks=256, block_size=8, max_num_seqs=16, max_num_batched_tokens=40,
               enable_prefix_caching=True, enable_chunked_prefill=True)  # fmt: skip
TARGET = random_prompts(1, seed=21, low=45, high=46)[0]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=6, logprobs=5, ignore_eos=True),
]


def _signature(output) -> tuple:
    c = output.outputs[0]
    return c.token_ids, [sorted((t, lp.logprob) for t, lp in entry.items()) for entry in c.logprobs]


def _neighbours(rng: random.Random, count: int) -> list[list[int]]:
    prompts = random_prompts(count, seed=rng.randrange(10**6), low=3, high=70)
    for i in range(count):
        if rng.random() < 0.3:  # shares the target's first blocks: a prefix-cache hit for whoever runs second
            prompts[i] = TARGET[: rng.randrange(8, 40)] + prompts[i]
    return prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_request_is_bit_identical_alone_and_in_any_batch(tiny_model_dir, arch: str) -> None:
    llm = LLM(str(tiny_model_dir(arch=arch)), deterministic=True, **OPTIONS)
    runner = llm.llm_engine.runner
    assert all(layer.batch_invariant for layer in runner.attn_layers)
    for params in PARAMS:
        alone = _signature(llm.generate([TARGET], params, use_tqdm=False)[0])
        assert len(alone[0]) == 6
        rng = random.Random(params.temperature)
        for size in range(1, 9):
            others = _neighbours(rng, size - 1)
            place = rng.randrange(size)
            prompts = [*others[:place], TARGET, *others[place:]]
            neighbour_params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 9), ignore_eos=True)
            outs = llm.generate(prompts, [neighbour_params] * place + [params] + [neighbour_params] * (size - 1 - place),
                                use_tqdm=False)  # fmt: skip
            assert _signature(outs[place]) == alone, f"batch of {size}, target at {place}"


def test_default_mode_is_unchanged(tiny_model_dir) -> None:
    """deterministic=False (the default) builds exactly the layers and attention it always did."""
    llm = LLM(str(tiny_model_dir(arch="llama")), **OPTIONS)
    runner = llm.llm_engine.runner
    assert runner.config.deterministic is False
    modules = list(runner.model.modules())
    assert all(type(m.quant_method) is UnquantizedLinearMethod for m in modules if hasattr(m, "quant_method"))
    assert any(type(m) is RMSNorm for m in modules) and not any(isinstance(m, InvariantRMSNorm) for m in modules)
    assert type(runner.model.lm_head).__name__ == "LMHead"
    assert all(isinstance(a, TorchRefAttentionBackend) and not a.batch_invariant for a in runner.attn_layers)
    det = LLM(str(tiny_model_dir(arch="llama")), deterministic=True, **OPTIONS).llm_engine.runner
    assert any(isinstance(getattr(m, "quant_method", None), InvariantLinearMethod) for m in det.model.modules())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative decoding"),
        (dict(model_impl="transformers"), "transformers' modelling code"),
        (dict(enable_lora=True), "enable_lora"),
        (dict(runner="pooling"), "runner='pooling'"),
    ],
)
def test_refused_combinations(tiny_model_dir, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match="deterministic=True does not support.*" + message.replace("(", r"\(")):
        LLM(str(tiny_model_dir(arch="llama")), deterministic=True, **OPTIONS, **extra)


def test_a_non_boolean_value_is_refused() -> None:
    from kvik.config import EngineConfig

    with pytest.raises(ValueError, match="deterministic must be True or False"):
        EngineConfig(model="m", deterministic="yes")  # type: ignore[arg-type]


def test_refused_architecture_names_the_layer(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="MoEExperts"):
        LLM(str(tiny_model_dir(arch="mixtral")), deterministic=True, **OPTIONS)


def test_cli_flag() -> None:
    from kvik.entrypoints.cli import build_parser, engine_kwargs

    parser = build_parser()
    assert engine_kwargs(parser.parse_args(["generate", "hi", "--deterministic"]))["deterministic"] is True
    assert engine_kwargs(parser.parse_args(["generate", "hi"]))["deterministic"] is False


def test_a_quantized_checkpoint_is_dequantized_not_refused() -> None:
    """The bundled SmolLM2 GGUF (Q4_1): deterministic mode runs it dense rather than refusing it."""
    from kvik.config import EngineConfig, WeightsMode
    from kvik.engine.config_resolution import resolve_config
    from kvik.models.default import default_model
    from kvik.platforms.selector import resolve_platform
    from kvik.plugins.manager import get_plugin_manager

    manager = get_plugin_manager()
    config = EngineConfig(model=str(default_model()), device="cpu", deterministic=True)
    resolution = resolve_config(config, resolve_platform("cpu", manager), manager)
    assert resolution.config.quantized_weights is WeightsMode.DEQUANTIZE
    assert resolution.sources["quantized_weights"].startswith("derived: deterministic")
    packed = EngineConfig(model=str(default_model()), device="cpu", deterministic=True, quantized_weights="quantized")
    with pytest.raises(ValueError, match="weights kept packed"):
        resolve_config(packed, resolve_platform("cpu", manager), manager)
