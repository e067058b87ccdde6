"""KV-cache scale tensors in a checkpoint, under every name the writers use, load into the attention layers."""

from __future__ import annotations

import shutil
from pathlib import Path

import kvik
import pytest
import torch
from kvik.models.kv_scales import kv_scale_target
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("model.layers.3.self_attn.k_scale", ("model.layers.3.self_attn", ("k",))),  # compressed-tensors
        ("model.layers.3.self_attn.v_proj.v_scale", ("model.layers.3.self_attn", ("v",))),  # ModelOpt
        ("model.layers.3.self_attn.k_proj.output_scale", ("model.layers.3.self_attn", ("k",))),  # older CT
        ("model.layers.3.self_attn.kv_scale", ("model.layers.3.self_attn", ("k", "v"))),  # AutoFP8
        ("model.layers.3.self_attn.k_proj.weight_scale", None),
        ("model.layers.3.self_attn.q_proj.input_scale", None),
    ],
)
def test_kv_scale_names(name: str, target: object) -> None:
    assert kv_scale_target(name) == target


def _with_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    save_file({**weights, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("model_impl", ["kvik", "transformers"])
def test_scales_load_per_layer_and_per_head_scales_reduce_to_their_max(
    tiny_model_dir, tmp_path: Path, model_impl: str
) -> None:
    extra = {
        "model.layers.0.self_attn.kv_scale": torch.tensor(0.5),
        "model.layers.1.self_attn.k_proj.k_scale": torch.tensor([0.25, 0.75]),  # per head
        "model.layers.1.self_attn.v_proj.v_scale": torch.tensor([2.0]),
    }
    path = _with_tensors(tiny_model_dir("llama"), tmp_path / "scaled", extra)
    llm = kvik.LLM(str(path), device="cpu", num_kv_blocks=40, kv_cache_dtype="fp8", model_impl=model_impl)
    runner = llm.llm_engine.runner
    assert runner is not None
    assert [(a.k_scale, a.v_scale) for a in runner.attn_layers] == [(0.5, 0.5), (0.75, 2.0)]
    # With the model-dtype cache the scales load (the checkpoint is valid) and change nothing.
    plain = kvik.LLM(str(path), device="cpu", num_kv_blocks=40, model_impl=model_impl)
    reference = kvik.LLM(str(tiny_model_dir("llama")), device="cpu", num_kv_blocks=40, model_impl=model_impl)
    params = kvik.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in plain.generate([[5, 6, 7]], params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in reference.generate([[5, 6, 7]], params, use_tqdm=False)
    ]


def test_a_scale_for_a_layer_the_model_lacks_is_an_unknown_weight(tiny_model_dir, tmp_path: Path) -> None:
    path = _with_tensors(tiny_model_dir("llama"), tmp_path / "bad", {"model.layers.9.self_attn.k_scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"does not know: model.layers.9.self_attn.k_scale"):
        kvik.LLM(str(path), device="cpu", num_kv_blocks=40, kv_cache_dtype="fp8")


def test_a_non_positive_scale_is_refused_at_load(tiny_model_dir, tmp_path: Path) -> None:
    path = _with_tensors(tiny_model_dir("llama"), tmp_path / "zero", {"model.layers.0.self_attn.v_scale": torch.tensor(0.0)})
    with pytest.raises(ValueError, match=r"v_scale must be a positive finite number, got 0.0"):
        kvik.LLM(str(path), device="cpu", num_kv_blocks=40, kv_cache_dtype="fp8")
