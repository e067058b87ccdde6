"""Format resolution, model config resolution and weight loading (dense, sharded, quantized)."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kvik.config import EngineConfig
from kvik.layers.linear import Linear
from kvik.models.model_config import build_model_config, resolve_format
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginManager
from kvik.quantization.base import QuantizationMethod
from kvik.quantization.unquantized import UnquantizedLinearMethod
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.testing.tiny_models import make_tiny_model
from kvik.worker.torch_runner import TorchModelRunner
from safetensors.torch import load_file, save_file

PROMPT = [5, 17, 300, 42, 7, 99, 128, 64, 3]


def prefill_logits(runner: TorchModelRunner, tokens: list[int] = PROMPT) -> torch.Tensor:
    req = ScheduledRequest("r", tokens, 0, list(range(1, 1 + -(-len(tokens) // 4))), True, SamplingParams())
    return runner.compute_logits(SchedulerOutput([req], len(tokens)), all_tokens=True)


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def config_for(path: Path, pm: PluginManager, **options: object) -> object:
    return build_model_config(EngineConfig(model=str(path), **options), resolve_format(str(path), pm), pm)


def test_sharded_checkpoint_loads_identically(tmp_path: Path, make_runner: Callable[..., TorchModelRunner]) -> None:
    single = make_tiny_model(tmp_path / "single", seed=3)
    sharded = make_tiny_model(tmp_path / "sharded", seed=3, shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = make_runner(single), make_runner(sharded)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert torch.equal(prefill_logits(a), prefill_logits(b))


def test_missing_path_is_a_clear_error(tmp_path: Path, pm: PluginManager) -> None:
    with pytest.raises(ValueError, match=r"does not exist.*safetensors"):
        resolve_format(str(tmp_path / "nope"), pm)


def test_directory_without_config_is_not_recognised(tmp_path: Path, pm: PluginManager) -> None:
    with pytest.raises(ValueError, match=r"not a checkpoint kvik recognises \(registered formats: safetensors\)"):
        resolve_format(str(tmp_path), pm)


def test_malformed_config_names_the_file(tmp_path: Path, pm: PluginManager) -> None:
    path = make_tiny_model(tmp_path / "m")
    (path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        config_for(path, pm)
    (path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match="no 'model_type'"):
        config_for(path, pm)


def test_unregistered_architecture_lists_registered_ones(tmp_path: Path, pm: PluginManager) -> None:
    path = make_tiny_model(tmp_path / "m")
    edit_config(path, architectures=["FancyForMaskedLM"])  # not causal: the transformers fallback refuses it too
    with pytest.raises(
        ValueError,
        match=r"FancyForMaskedLM.*LlamaForCausalLM, .*MistralForCausalLM, .*MixtralForCausalLM, .*Phi3ForCausalLM, Qwen2ForCausalLM",
    ):
        config_for(path, pm)


def test_dtype_auto_follows_the_checkpoint(tmp_path: Path, pm: PluginManager) -> None:
    f32 = make_tiny_model(tmp_path / "f32")
    bf16 = make_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    assert config_for(f32, pm).dtype == "float32"
    assert config_for(bf16, pm).dtype == "bfloat16"
    assert config_for(f32, pm, dtype="bfloat16").dtype == "bfloat16"
    edit_config(f32, torch_dtype=None, dtype=None)
    assert config_for(f32, pm).dtype == "float32"  # missing: float32


def test_explicit_dtype_casts_the_weights(tmp_path: Path, make_runner: Callable[..., TorchModelRunner]) -> None:
    path = make_tiny_model(tmp_path / "m")
    f32 = make_runner(path)
    bf16 = make_runner(path, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.kv_caches[0].dtype == torch.bfloat16
    ref = prefill_logits(f32)
    got = prefill_logits(bf16)
    assert got.dtype == torch.float32
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7
    torch.testing.assert_close(got, ref, atol=0.25, rtol=0.05)


def test_model_facts(tmp_path: Path, pm: PluginManager) -> None:
    path = make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=8, eos_token_id=2, head_dim=32)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    mc = config_for(path, pm)
    assert (mc.architecture, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (
        "MistralForCausalLM",
        2,
        4,
        2,
        32,
    )
    assert mc.sliding_window == 8
    assert mc.eos_token_ids == frozenset({2, 5})
    assert mc.max_model_len == mc.max_position_embeddings == 512
    assert mc.quantization is None


@pytest.mark.parametrize("max_window_layers,expected", [(1, 8), (2, None)])
def test_sliding_window_counts_only_layers_that_slide(
    tmp_path: Path, pm: PluginManager, max_window_layers: int, expected: int | None
) -> None:
    path = make_tiny_model(
        tmp_path / "q", arch="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=max_window_layers
    )
    assert config_for(path, pm).sliding_window == expected


def test_max_model_len_limits(tmp_path: Path, pm: PluginManager) -> None:
    plain = make_tiny_model(tmp_path / "plain")
    assert config_for(plain, pm, max_model_len=100).max_model_len == 100
    assert config_for(plain, pm, max_model_len="auto").max_model_len == 512
    with pytest.raises(ValueError, match="max_model_len=1000 is longer than the model supports"):
        config_for(plain, pm, max_model_len=1000)
    scaled = make_tiny_model(tmp_path / "scaled", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config_for(scaled, pm, max_model_len=1000).max_model_len == 1000


def _rewrite_weights(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_weights_are_named(tmp_path: Path, make_runner: Callable[..., TorchModelRunner]) -> None:
    path = make_tiny_model(tmp_path / "m")
    _rewrite_weights(path, lambda t: (t.pop("model.layers.1.self_attn.k_proj.weight"), t.pop("model.norm.weight")))
    with pytest.raises(ValueError, match=r"no weights for: .*layers\.1\.self_attn\.qkv_proj\[1\].*model\.norm\.weight"):
        make_runner(path)


def test_unknown_weights_are_named_and_tied_head_is_ignored(
    tmp_path: Path, make_runner: Callable[..., TorchModelRunner]
) -> None:
    path = make_tiny_model(tmp_path / "m", tie_word_embeddings=True)

    def add_tied_head(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite_weights(path, add_tied_head)
    runner = make_runner(path)
    assert runner.model.lm_head.tied
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"does not know: model\.layers\.0\.mlp\.extra_proj\.weight"):
        make_runner(path)


# -- a third-party quantization method, hooked in the way example_int8 does ------------


class ToyInt8Method(QuantizationMethod):
    """Per-output-row symmetric int8: ``weight`` int8 plus ``weight_scale`` float32 per row."""

    name = "toy_int8"

    def create_weights(self, layer: Linear, dtype: torch.dtype, device: torch.device) -> None:
        shape = (layer.output_size, layer.input_size)
        layer.qweight = torch.nn.Parameter(torch.zeros(shape, dtype=torch.int8, device=device), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(torch.zeros(shape[0], device=device), requires_grad=False)

    def load_weight(self, layer: Linear, name: str, value: torch.Tensor, shard: int | None) -> None:
        target = {"weight": layer.qweight, "weight_scale": layer.weight_scale}[name].data
        if shard is not None:
            start = sum(layer.output_sizes[:shard])
            target = target[start : start + layer.output_sizes[shard]]
        target.copy_(value)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(layer).to(x.dtype))

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.qweight.float() * layer.weight_scale[:, None]


@pytest.fixture
def int8_checkpoint(tmp_path: Path, pm: PluginManager) -> tuple[Path, Path]:
    """(quantized checkpoint, dense checkpoint holding its dequantized weights), toy_int8 registered in ``pm``."""
    plugin = types.ModuleType("toy_int8_plugin")
    plugin.KVIK_PLUGIN_API = ">=2.0,<3"

    @hookimpl
    def kvik_register_quantization_methods(register: Callable[[str, str], None]) -> None:
        register("toy_int8", f"{__name__}:ToyInt8Method")

    plugin.kvik_register_quantization_methods = kvik_register_quantization_methods
    pm.register(plugin, "toy_int8_plugin")
    quant = make_tiny_model(tmp_path / "q", seed=5)
    dense = make_tiny_model(tmp_path / "d", seed=5)

    def quantize(t: dict[str, torch.Tensor]) -> None:
        for name in [n for n in t if n.endswith("_proj.weight")]:
            w = t[name]
            scale = w.abs().amax(dim=1) / 127
            t[name] = torch.round(w / scale[:, None]).to(torch.int8)
            t[name.replace(".weight", ".weight_scale")] = scale

    def dequantize(t: dict[str, torch.Tensor]) -> None:
        quantize(t)
        for name in [n for n in t if n.endswith("_proj.weight")]:
            t[name] = t[name].float() * t.pop(name.replace(".weight", ".weight_scale"))[:, None]

    _rewrite_weights(quant, quantize)
    _rewrite_weights(dense, dequantize)
    edit_config(quant, quantization_config={"quant_method": "toy_int8", "bits": 8})
    return quant, dense


@pytest.mark.parametrize("mode", ["quantized", "dequantize"])
def test_quantized_checkpoint_through_a_plugin_method(
    mode: str, int8_checkpoint: tuple[Path, Path], make_runner: Callable[..., TorchModelRunner]
) -> None:
    quant, dense = int8_checkpoint
    runner = make_runner(quant, quantized_weights=mode)
    assert runner.model_config.quantization == "toy_int8"
    methods = {type(m.quant_method) for m in runner.model.modules() if isinstance(m, Linear)}
    assert methods == ({ToyInt8Method} if mode == "quantized" else {UnquantizedLinearMethod})
    torch.testing.assert_close(prefill_logits(runner), prefill_logits(make_runner(dense)), atol=1e-4, rtol=1e-4)


def test_requested_quantization_must_match_the_checkpoint(tmp_path: Path, pm: PluginManager) -> None:
    path = make_tiny_model(tmp_path / "m")
    with pytest.raises(ValueError, match="'toy_int8' is not an installed quantization method"):
        config_for(path, pm, quantization="toy_int8")
