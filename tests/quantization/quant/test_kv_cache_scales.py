"""FP8 KV-cache scales from an llm-compressor checkpoint (``kv_cache_scheme``: per-layer ``self_attn.k_scale`` /
``v_scale``, made by the real llm-compressor in make_fixtures.py) load into each layer's attention backend."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import kvik
import pytest
import quant_checkpoints as ckpt
from kvik import SamplingParams
from kvik.testing.reference import random_prompts
from safetensors import safe_open


@pytest.fixture(scope="module")
def kv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ckpt.fixture("ct_fp8_kv", tmp_path_factory.mktemp("ct_fp8_kv") / "ct_fp8_kv")


def _scales(path: Path) -> dict[str, float]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: float(f.get_tensor(k).float().max()) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}  # noqa: SIM118


def test_checkpoint_scales_reach_every_layer_and_generation_agrees(kv_checkpoint: Path, caplog) -> None:
    scales = _scales(kv_checkpoint)
    assert len(scales) == 4  # two layers x (k, v): the fixture is what llm-compressor writes
    with caplog.at_level(logging.INFO, logger="kvik.worker.torch_runner"):
        fp8 = kvik.LLM(str(kv_checkpoint), device="cpu", dtype="float32", num_kv_blocks=64,
                       quantized_weights="dequantize", kv_cache_dtype="fp8")  # fmt: skip
    runner = fp8.llm_engine.runner
    assert runner is not None
    for i, layer in enumerate(runner.attn_layers):
        assert layer.kv_scales_from_checkpoint
        assert layer.k_scale == scales[f"model.layers.{i}.self_attn.k_scale"]
        assert layer.v_scale == scales[f"model.layers.{i}.self_attn.v_scale"]
    assert any("k_scale/v_scale of 2 layers from the checkpoint" in r.getMessage() for r in caplog.records)
    auto = kvik.LLM(str(kv_checkpoint), device="cpu", dtype="float32", num_kv_blocks=64, quantized_weights="dequantize")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = random_prompts(6, seed=4, low=6, high=30)
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in auto.generate(prompts, params, use_tqdm=False)]
    assert sum(g[0] == r[0] for g, r in zip(got, ref, strict=True)) >= 5  # calibrated scales: first tokens agree


def test_an_int8_kv_cache_scheme_is_refused_naming_what_works(kv_checkpoint: Path) -> None:
    from kvik_quant.compressed_tensors import method_for_scheme

    config = json.loads((kv_checkpoint / "config.json").read_text())["quantization_config"]
    method_for_scheme(config)  # the fixture's FP8 scheme is accepted
    bad = copy.deepcopy(config)
    bad["kv_cache_scheme"].update(type="int", num_bits=8)
    with pytest.raises(
        ValueError, match=r"int8 tensor KV cache \(kv_cache_scheme\) is not supported.*kv_cache_dtype='fp8'"
    ):
        method_for_scheme(bad)


def test_scales_served_with_the_model_dtype_cache_are_noted(kv_checkpoint: Path, kvik_plugin_manager) -> None:
    from kvik.config import EngineConfig
    from kvik.engine.config_resolution import resolve_config
    from kvik.testing.host_platform import HostCPUPlatform
    from kvik_quant import plugin as quant_plugin

    kvik_plugin_manager.register(quant_plugin, "quant", "kvik-quant")
    notes = resolve_config(EngineConfig(model=str(kv_checkpoint)), HostCPUPlatform(), kvik_plugin_manager).notes
    assert any("carries FP8 KV-cache scales" in n and "kv_cache_dtype='fp8'" in n for n in notes), notes
    fp8 = resolve_config(EngineConfig(model=str(kv_checkpoint), kv_cache_dtype="fp8"), HostCPUPlatform(),
                         kvik_plugin_manager)  # fmt: skip
    assert not any("carries FP8 KV-cache scales" in n for n in fp8.notes)
