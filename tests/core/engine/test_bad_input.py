"""Bad input gets a clear error, never a crash or a hang."""

from __future__ import annotations

import json

import pytest
from kvik import LLM, SamplingParams
from kvik.plugins.registry import PluginError


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"200 tokens but max_model_len is 128"):
        llm.generate([[5] * 200])
    # The engine still works afterwards.
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].finished


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(n=0), "n"),
        (dict(top_k=-5), "top_k"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_out_of_vocab_token_ids(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 100000]])


def test_unknown_model_dir(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        LLM(str(tmp_path / "nope"), device="cpu")
    assert "nope" in str(info.value)


def test_unregistered_architecture_lists_registered(tiny_model_dir, tmp_path):
    import shutil

    src = tiny_model_dir("llama")
    dst = tmp_path / "weird"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    # Not a causal LM, so neither a native architecture nor the transformers fallback can run it.
    config["architectures"] = ["WeirdForMaskedLM"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, PluginError)) as info:
        LLM(str(dst), device="cpu")
    assert "WeirdForMaskedLM" in str(info.value) and "LlamaForCausalLM" in str(info.value)
    assert "name no causal LM" in str(info.value)


def test_unknown_engine_option():
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM("x", not_an_option=1)
