"""load_format="dummy": seeded random weights of the right shapes, nothing read but config and tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def config_only(tiny_model_dir, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """A checkpoint folder without its weights: config.json and the tokenizer only."""
    folder = tmp_path / "shape-only"
    shutil.copytree(tiny_model_dir("llama"), folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_dummy_weights_generate_deterministically_without_a_checkpoint(config_only) -> None:
    import kvik

    params = kvik.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]

    def run(seed: int) -> list[list[int]]:
        llm = kvik.LLM(str(config_only), device="cpu", load_format="dummy", seed=seed, num_kv_blocks=32,
                       max_model_len=64)  # fmt: skip
        assert llm.llm_engine.runner.weight_bytes() > 0
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    first = run(0)
    assert all(len(t) == 5 for t in first) and run(0) == first  # the same seed, the same model


def test_without_dummy_the_missing_weights_are_an_error(config_only) -> None:
    import kvik

    with pytest.raises(ValueError, match=r"no \*\.safetensors files in"):
        kvik.LLM(str(config_only), device="cpu", num_kv_blocks=32, max_model_len=64)
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        kvik.LLM(str(config_only), device="cpu", load_format="random")
