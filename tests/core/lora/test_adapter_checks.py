"""Bad adapters, bad options and unsupported combinations are refused with a message naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kvik import LLM, EngineConfig, LoRARequest, SamplingParams
from kvik.lora.adapter import check_adapter, read_config
from lora_world import LoRAWorld
from safetensors.torch import load_file, save_file

ONE = SamplingParams(max_tokens=1)


@pytest.fixture(scope="module")
def llm(lora_world: LoRAWorld) -> LLM:
    return LLM(str(lora_world.base), enable_lora=True, max_loras=2, max_lora_rank=4, num_kv_blocks=64,
               max_model_len=128)  # fmt: skip


def _copy(src: str, dst: Path, **config_changes: object) -> str:
    shutil.copytree(src, dst)
    config = read_config(str(dst))
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return str(dst)


def _refused(llm: LLM, request: LoRARequest, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(["hello"], ONE, use_tqdm=False, lora_request=request)


def test_bad_paths_and_files(llm: LLM, tmp_path: Path) -> None:
    _refused(llm, LoRARequest("x", 10, str(tmp_path / "nope")), "no such directory")
    (tmp_path / "empty").mkdir()
    _refused(llm, LoRARequest("x", 11, str(tmp_path / "empty")), "adapter_config.json is missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    _refused(llm, LoRARequest("x", 12, str(tmp_path / "bad")), "not valid JSON")


def test_rank_above_max_and_unsupported_features(llm: LLM, lora_world: LoRAWorld, tmp_path: Path) -> None:
    qv, big = lora_world.loras[0].lora_path, lora_world.loras[1].lora_path  # ranks 4 and 8
    _refused(llm, LoRARequest("big", 20, big), r"rank 8 exceeds max_lora_rank=4")
    cases = {
        "dora": ({"use_dora": True}, "DoRA"),
        "save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        "bias": ({"bias": "all"}, "bias='all'"),
        "pattern": ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        "prefix": ({"peft_type": "PREFIX_TUNING"}, "only LoRA"),
        "rank": ({"r": 2}, r"do not match rank 2"),  # the tensors say 4: shapes checked against the config
    }
    for i, (name, (change, match)) in enumerate(cases.items()):
        _refused(llm, LoRARequest(name, 30 + i, _copy(qv, tmp_path / name, **change)), match)
    # An adapter trained for another shape of model.
    targets = {"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.0.self_attn.v_proj": (64, 32)}
    with pytest.raises(ValueError, match=r"was the adapter trained for another base model"):
        check_adapter(qv, 8, targets)
    # Integer weights: refused at admission (the read into the slots' dtype happens off the step).
    ints = _copy(qv, tmp_path / "ints")
    tensors = load_file(f"{ints}/adapter_model.safetensors")
    save_file({k: v.to(torch.int8) for k, v in tensors.items()}, f"{ints}/adapter_model.safetensors")
    _refused(llm, LoRARequest("ints", 50, ints), r"is I8; adapter weights must be one of")


def test_id_reuse_and_lora_off(llm: LLM, lora_world: LoRAWorld) -> None:
    qv, mlp = lora_world.loras[0], lora_world.loras[2]
    llm.generate(["hello"], ONE, use_tqdm=False, lora_request=LoRARequest("first", 40, qv.lora_path))
    _refused(llm, LoRARequest("second", 40, mlp.lora_path), "already names adapter 'first'")
    with pytest.raises(ValueError, match="got 2 lora_requests for 1 prompts"):
        llm.generate(["hello"], ONE, use_tqdm=False, lora_request=[None, qv])
    plain = LLM(str(lora_world.base), num_kv_blocks=64, max_model_len=128)
    _refused(plain, qv, "LoRA is off; start the engine with enable_lora=True")


def test_option_checks() -> None:
    with pytest.raises(ValueError, match="max_loras must be an integer >= 1"):
        EngineConfig(max_loras=0)
    with pytest.raises(ValueError, match=r"max_lora_rank must be an integer in \[1, 256\]"):
        EngineConfig(max_lora_rank=512)
    with pytest.raises(ValueError, match="max_cpu_loras must be >= max_loras"):
        EngineConfig(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("x", 0, "/p")


def test_quantized_bases_are_refused_unless_dequantized() -> None:
    from kvik.engine.config_resolution import resolve_config
    from kvik.models.default import default_model
    from kvik.platforms.selector import resolve_platform
    from kvik.plugins.manager import get_plugin_manager

    manager = get_plugin_manager()
    platform = resolve_platform("cpu", manager)
    try:
        model = default_model()
    except (ImportError, ValueError) as exc:
        pytest.skip(f"the bundled SmolLM2 GGUF is not installed: {exc}")
    with pytest.raises(ValueError, match=r"quantized_weights=.quantized.*not supported"):
        resolve_config(EngineConfig(model=model, enable_lora=True, quantized_weights="quantized"), platform, manager)
    resolution = resolve_config(EngineConfig(model=model, enable_lora=True), platform, manager)
    assert resolution.config.quantized_weights.value == "dequantize"
    assert resolution.config.max_cpu_loras == 1 and resolution.sources["max_cpu_loras"].startswith("derived")


def test_removing_an_adapter_with_requests_in_flight_is_refused(llm: LLM, lora_world: LoRAWorld) -> None:
    from kvik.lora.registry import LoRAInUseError

    engine = llm.llm_engine
    qv = LoRARequest("removable", 50, lora_world.loras[0].lora_path)
    llm.generate(["hello"], ONE, use_tqdm=False, lora_request=qv)  # known, and in a slot
    assert 50 in engine.runner.lora.slot_of  # type: ignore[attr-defined]
    engine.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=4), lora_request=qv)
    with pytest.raises(LoRAInUseError, match="1 request"):
        engine.remove_lora(50)
    engine.abort_request("busy")
    assert engine.remove_lora(50) is True and engine.remove_lora(50) is False
    assert 50 not in engine.runner.lora.slot_of  # type: ignore[attr-defined]
    assert engine.loras is not None and all(r.lora_int_id != 50 for r in engine.loras.list())


def test_gguf_base_runs_adapters_dequantized(tmp_path: Path) -> None:
    from kvik.models.default import default_model
    from kvik.testing.tiny_lora import write_random_adapter

    try:
        model = default_model()
    except (ImportError, ValueError) as exc:
        pytest.skip(f"the bundled SmolLM2 GGUF is not installed: {exc}")
    llm = LLM(model, enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128, num_kv_blocks=32)
    hf = llm.llm_engine.model_config.hf_config
    zero = write_random_adapter(tmp_path / "zero", hf, rank=8, std=0.0, dtype="float32")
    some = write_random_adapter(tmp_path / "some", hf, rank=8, std=0.1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    loras = [None, LoRARequest("zero", 1, str(zero)), LoRARequest("some", 2, str(some))]
    outputs = llm.generate(["The capital of France is"] * 3, params, use_tqdm=False, lora_request=loras)
    base, zeroed, adapted = (list(o.outputs[0].token_ids) for o in outputs)
    assert zeroed == base  # an all-zero adapter is the base model
    assert adapted != base


def test_the_transformers_fallback_is_refused(lora_world: LoRAWorld) -> None:
    from kvik.engine.config_resolution import resolve_config
    from kvik.platforms.selector import resolve_platform
    from kvik.plugins.manager import get_plugin_manager

    manager = get_plugin_manager()
    config = EngineConfig(model=str(lora_world.base), enable_lora=True, model_impl="transformers")
    with pytest.raises(ValueError, match="enable_lora needs kvik's native modelling code"):
        resolve_config(config, resolve_platform("cpu", manager), manager)
