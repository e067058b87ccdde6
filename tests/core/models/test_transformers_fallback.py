"""Architectures kvik has no native code for run through transformers' modelling code on the paged cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from kvik.testing.tiny_models import build_tokenizer

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
FALLBACK_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (config class, model class, overrides)
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5, "use_parallel_residual": True}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"num_key_value_heads": 2}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "num_key_value_heads": 2,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 4.0,
        },
    ),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"num_key_value_heads": 2, "partial_rotary_factor": 0.25}),
}
PROMPTS = [[5, 17, 33, 9, 100, 7], [40, 41, 42], list(range(60, 83)), [300, 12, 77, 5, 5, 19, 250, 3, 8]]
NEW_TOKENS = 10


def _checkpoint(root: Path, case: str) -> Path:
    config_cls, model_cls, overrides = FALLBACK_CASES[case]
    path = root / case
    if path.exists():
        return path
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)  # sharper logits: greedy decoding is not a coin toss
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(512).save_pretrained(path)
    return path


def _hf_greedy(path: Path, prompt: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_fallback_is_token_identical_to_transformers(case: str, tmp_path_factory) -> None:
    import kvik

    path = _checkpoint(tmp_path_factory.getbasetemp() / "fallback", case)
    expected = [_hf_greedy(path, p) for p in PROMPTS]
    params = kvik.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for options in ({}, {"enable_prefix_caching": False, "max_num_batched_tokens": 16, "block_size": 8}):
        llm = kvik.LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=128, **options)
        assert llm.llm_engine.model_config.architecture == "TransformersForCausalLM"
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS + PROMPTS[:1], params)]
        assert got[:-1] == expected, options  # batched, mixed lengths, chunked prefill in the second pass
        assert got[-1] == expected[0]  # a repeated prompt (a prefix-cache hit in the first pass)


def test_architectures_the_fallback_refuses(tmp_path) -> None:
    import kvik.builtin
    from kvik.config import EngineConfig
    from kvik.models.model_config import build_model_config, resolve_format
    from kvik.plugins.manager import PluginManager

    manager = PluginManager(load_entrypoints=False)
    manager.register(kvik.builtin, "builtin", "kvik-core")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)  # fmt: skip
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertForMaskedLM is not supported.*name no causal LM"):
        build_model_config(EngineConfig(model=str(tmp_path)), resolve_format(str(tmp_path), manager), manager)


def test_model_impl_transformers_runs_a_native_architecture_through_the_fallback(tmp_path) -> None:
    """model_impl='transformers' (vLLM's switch) forces the fallback on Llama: the same greedy tokens as native."""
    import kvik
    from kvik.testing.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "llama", "llama")
    params = kvik.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = {}
    for impl in ("kvik", "transformers"):
        llm = kvik.LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128, model_impl=impl)
        arch = llm.llm_engine.model_config.architecture
        assert (arch == "TransformersForCausalLM") == (impl == "transformers"), arch
        outputs[impl] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert outputs["kvik"] == outputs["transformers"]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_mixed_window_layers_through_the_fallback_keep_their_global_blocks(tmp_path, arch: str) -> None:
    """Gemma's sliding and global layers through transformers' code: the KV-cache groups come from the
    built layers' own windows (the config's ``layer_types``), so the global layers keep every block while
    the sliding ones release theirs, and the greedy tokens stay transformers' in a pool small enough to
    preempt (releasing a global layer's blocks would change them)."""
    import kvik
    from kvik.testing.reference import hf_greedy, random_prompts
    from kvik.testing.tiny_models import make_tiny_model

    extra = {"attn_logit_softcapping": None, "final_logit_softcapping": None} if arch == "gemma2" else {}
    path = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=4 if arch == "gemma2" else 7, head_dim=32,
                           query_pre_attn_scalar=32, sliding_window=8, **extra)  # fmt: skip
    prompts = random_prompts(5, seed=3, low=30, high=60)
    expected = hf_greedy(path, prompts, 24)
    options = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16, max_model_len=128,
                   model_impl="transformers")  # fmt: skip
    big = kvik.LLM(str(path), num_kv_blocks=600, **options)
    windows = big.llm_engine.scheduler.group_windows
    assert windows[0] is None and set(windows[1:]) == {8}
    params = kvik.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in big.generate(prompts, params)] == expected
    small = kvik.LLM(str(path), num_kv_blocks=big.llm_engine.memory_plan.blocks_per_request + 2, **options)
    assert [o.outputs[0].token_ids for o in small.generate(prompts, params)] == expected
    assert small.llm_engine.scheduler.get_stats().num_preemptions > 0


def test_model_impl_kvik_refuses_an_architecture_without_native_code(tmp_path) -> None:
    from kvik.config import EngineConfig
    from kvik.models.model_config import build_model_config, resolve_format

    path = _checkpoint(tmp_path, "olmo2")
    with pytest.raises(ValueError, match=r"model_impl='kvik'.*Olmo2ForCausalLM.*model_impl='auto'"):
        build_model_config(EngineConfig(model=str(path), model_impl="kvik"), resolve_format(str(path)))
    with pytest.raises(ValueError, match="model_impl must be one of"):
        EngineConfig(model=str(path), model_impl="native")
