"""Bad checkpoints of the native architectures get errors naming the tensor or config field."""

from __future__ import annotations

import json
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kvik import LLM
from kvik.models.mixtral import required
from safetensors.torch import load_file, save_file

MIXTRAL = dict(arch="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48)


def _llm(path: Path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)


def _edit(
    tiny_model_dir: Any,
    tmp_path: Path,
    model: dict[str, Any],
    config: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(tiny_model_dir(**model), dst)
    if config is not None:
        values = json.loads((dst / "config.json").read_text())
        config(values)
        (dst / "config.json").write_text(json.dumps(values))
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        tensors(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_expert_weight_of_the_wrong_shape_names_the_checkpoint_tensor(tiny_model_dir: Any, tmp_path: Path) -> None:
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"

    def shrink(w: dict) -> None:
        w[name] = w[name][:40].clone()

    with pytest.raises(ValueError, match=rf"{name} .*has shape \(40, 64\), expected \(48, 64\)"):
        _llm(_edit(tiny_model_dir, tmp_path, MIXTRAL, tensors=shrink))


def test_missing_expert_weight_is_named(tiny_model_dir: Any, tmp_path: Path) -> None:
    def drop(w: dict) -> None:
        del w["model.layers.0.block_sparse_moe.experts.3.w2.weight"]

    with pytest.raises(ValueError, match=r"has no weights for: model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight"):
        _llm(_edit(tiny_model_dir, tmp_path, MIXTRAL, tensors=drop))


def test_expert_beyond_the_configured_count_is_named(tiny_model_dir: Any, tmp_path: Path) -> None:
    def extra(w: dict) -> None:
        w["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(48, 64)

    with pytest.raises(ValueError, match=r"experts\.4\.w1\.weight.*expert 4 does not exist; the config has 4"):
        _llm(_edit(tiny_model_dir, tmp_path, MIXTRAL, tensors=extra))


def test_fused_qkv_of_the_wrong_shape_is_named(tiny_model_dir: Any, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.qkv_proj.weight"

    def shrink(w: dict) -> None:
        w[name] = w[name][:-16].clone()

    with pytest.raises(
        ValueError, match=rf"cannot load {name}: weight shape \(112, 64\) does not match expected \(128, 64\)"
    ):
        _llm(_edit(tiny_model_dir, tmp_path, dict(arch="phi3"), tensors=shrink))


def test_config_field_of_the_wrong_type_is_named(tiny_model_dir: Any, tmp_path: Path) -> None:
    def unset(c: dict) -> None:
        c["num_experts_per_tok"] = None

    with pytest.raises(ValueError, match="num_experts_per_tok"):
        _llm(_edit(tiny_model_dir, tmp_path, MIXTRAL, config=unset))


def test_more_experts_per_token_than_experts(tiny_model_dir: Any, tmp_path: Path) -> None:
    def too_many(c: dict) -> None:
        c["num_experts_per_tok"] = 5

    with pytest.raises(ValueError, match=r"routes each token to 5 of 4 experts"):
        _llm(_edit(tiny_model_dir, tmp_path, MIXTRAL, config=too_many))


def test_required_names_the_missing_fields() -> None:
    cfg = types.SimpleNamespace(num_local_experts=8, moe_intermediate_size=0)
    assert required(cfg, "num_experts", "num_local_experts") == 8
    with pytest.raises(ValueError, match="no num_experts_per_tok"):
        required(cfg, "num_experts_per_tok")
    with pytest.raises(ValueError, match="moe_intermediate_size is 0"):
        required(cfg, "moe_intermediate_size")


def test_model_config_records_each_layers_window_and_the_soft_cap(tiny_model_dir: Any, pm: Any) -> None:
    from kvik.config import EngineConfig
    from kvik.engine.config_resolution import resolve_config
    from kvik.testing.host_platform import HostCPUPlatform

    path = tiny_model_dir(arch="gemma2", num_hidden_layers=4, sliding_window=10, attn_logit_softcapping=3.0)
    mc = resolve_config(EngineConfig(model=str(path)), HostCPUPlatform(), pm).model_config
    assert mc.layer_sliding_windows == (10, None, 10, None)
    assert mc.sliding_window == 10
    assert mc.attn_logits_soft_cap == 3.0
    plain = resolve_config(EngineConfig(model=str(tiny_model_dir(arch="qwen3"))), HostCPUPlatform(), pm).model_config
    assert plain.layer_sliding_windows == () and plain.attn_logits_soft_cap is None
