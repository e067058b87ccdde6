"""GGUF files written from tiny random HF checkpoints map back to the same config and weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from kvik_gguf import int4pack
from kvik_gguf.config import _llama3_rope, llama3_rope_factors
from kvik_gguf.convert import permute_rows, write_gguf
from kvik_gguf.format import GGUFFormat
from kvik_gguf.weight import GGUFWeight, unpermute_rows
from safetensors.torch import load_file
from transformers import AutoConfig


def _roundtrip(value: torch.Tensor, type_name: str) -> np.ndarray:
    """What a GGUF reader should give back for ``value`` stored as ``type_name`` (gguf-py's reference)."""
    qtype = GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), qtype), qtype)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf_format")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_config_and_weights_map_back(arch: str, qtype: str, tiny_model_dir: Callable[..., Path], out_dir: Path) -> None:
    model_dir = tiny_model_dir(arch)
    path = write_gguf(model_dir, out_dir / f"{arch}-{qtype}.gguf", qtype)
    assert GGUFFormat.matches(str(path))
    fmt = GGUFFormat(str(path))

    ref = AutoConfig.from_pretrained(model_dir)
    cfg = fmt.load_hf_config()
    # Llama: kvik_gguf's light config (transformers' LlamaConfig module is slow to import); others: transformers'
    assert cfg.model_type == ref.model_type and (arch == "llama" or type(cfg) is type(ref))
    assert cfg.architectures == ref.architectures
    for attr in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(cfg, attr) == getattr(ref, attr), attr
    assert cfg.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    # dtype="auto" starts from float32 for float weights, bfloat16 for quantized blocks (kvik_gguf.config)
    assert str(cfg.dtype).removeprefix("torch.") == ("float32" if qtype.startswith("F") else "bfloat16")

    original = load_file(str(model_dir / "model.safetensors"))
    dense = dict(fmt.iter_weights(quantized=False))
    assert set(dense) == set(original)
    for name, value in original.items():
        stored = qtype if name.endswith("_proj.weight") else "F32"
        # Bit-exact: right name, right rows (q/k un-permuted), right decoding.
        np.testing.assert_array_equal(dense[name].numpy(), _roundtrip(value, stored), err_msg=name)

    packed = dict(fmt.iter_weights(quantized=True))
    for name, value in packed.items():
        if name.endswith("_proj.weight") and qtype != "F32":
            assert isinstance(value, GGUFWeight), name
            assert value.type_name == qtype
            torch.testing.assert_close(value.dequantize(), dense[name], rtol=0, atol=0)
        else:
            assert isinstance(value, torch.Tensor), name
    quant = fmt.quantization()
    if qtype in ("F32", "F16"):
        assert quant is None
    else:
        assert quant is not None and quant[0] == "gguf"
        assert quant[1]["linear_weight_types"] == {qtype: 14}


def test_unpermute_inverts_the_converter_and_matches_transformers() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for heads, kv_heads in ((4, 4), (8, 2)):
        w = rng.standard_normal((kv_heads * 16, 24)).astype(np.float32)
        stored = permute_rows(w, kv_heads)
        assert not np.array_equal(stored, w)
        ours = unpermute_rows(torch.from_numpy(stored), kv_heads).numpy()
        np.testing.assert_array_equal(ours, w)
        theirs = LlamaTensorProcessor()._reverse_permute_weights(stored, heads, kv_heads)
        np.testing.assert_array_equal(ours, theirs)


def test_tied_embeddings_and_mistral(tiny_model_dir: Callable[..., Path], out_dir: Path) -> None:
    tied = GGUFFormat(str(write_gguf(tiny_model_dir("llama", tie_word_embeddings=True), out_dir / "tied.gguf")))
    assert tied.load_hf_config().tie_word_embeddings is True
    assert "lm_head.weight" not in dict(tied.iter_weights(False))

    mistral_dir = tiny_model_dir("mistral", sliding_window=32)
    fmt = GGUFFormat(str(write_gguf(mistral_dir, out_dir / "mistral.gguf", "Q8_0")))
    cfg = fmt.load_hf_config()
    assert cfg.architectures == ["MistralForCausalLM"] and cfg.sliding_window == 32
    original = load_file(str(mistral_dir / "model.safetensors"))
    q = dict(fmt.iter_weights(False))["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.numpy(), _roundtrip(original["model.layers.1.self_attn.q_proj.weight"], "Q8_0"))


def test_linear_rope_scaling(tiny_model_dir: Callable[..., Path], out_dir: Path) -> None:
    model_dir = tiny_model_dir("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4})
    cfg = GGUFFormat(str(write_gguf(model_dir, out_dir / "linear.gguf"))).load_hf_config()
    assert cfg.rope_parameters == {"rope_type": "linear", "rope_theta": 5e4, "factor": 2.0}


@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 16384)])
def test_llama3_rope_recovered_from_rope_freqs(params: tuple[float, float, float, int]) -> None:
    factor, low, high, original = params
    freqs = llama3_rope_factors(500000.0, 128, factor, low, high, original)
    recovered = _llama3_rope(500000.0, 128, freqs.astype(np.float32))
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == pytest.approx(factor)
    again = llama3_rope_factors(
        500000.0,
        128,
        recovered["factor"],
        recovered["low_freq_factor"],
        recovered["high_freq_factor"],
        recovered["original_max_position_embeddings"],
    )
    np.testing.assert_allclose(again, freqs, rtol=1e-4)


def _write_raw(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_file_is_a_clear_error(tiny_model_dir: Callable[..., Path], out_dir: Path) -> None:
    full = write_gguf(tiny_model_dir("llama"), out_dir / "full.gguf", "Q8_0")
    cut = out_dir / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert GGUFFormat.matches(str(cut))  # the header is intact
    with pytest.raises(ValueError, match=r"truncated or corrupt.*fetch it again"):
        GGUFFormat(str(cut)).load_hf_config()


def test_wrong_magic(tmp_path: Path) -> None:
    page = tmp_path / "model.gguf"
    page.write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(ValueError, match="not the GGUF magic"):
        GGUFFormat.matches(str(page))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert not GGUFFormat.matches(str(other))
    assert not GGUFFormat.matches(str(tmp_path))


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((8, 32), np.float32), 0)})
    with pytest.raises(ValueError, match=r"'gpt2' model.*supported architectures: llama, mistral, qwen2"):
        GGUFFormat(str(path)).load_hf_config()


def test_unsupported_quant_type_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    _, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]
    raw = np.zeros((4, size), dtype=np.uint8)  # 4 rows of one 256-value block
    path = _write_raw(
        tmp_path / "iq2.gguf",
        "llama",
        {"blk.0.ffn_up.weight": (raw, GGMLQuantizationType.IQ2_XXS)},
    )
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*IQ2_XXS.*supported types: F32, F16.*Q6_K"):
        GGUFFormat(str(path)).load_hf_config()


def test_found_through_its_entry_point() -> None:
    """The installed kvik-gguf distribution is discovered through the ``kvik`` entry-point group."""
    from kvik.plugins.manager import PluginManager
    from kvik_gguf.method import GGUFLinearMethod

    manager = PluginManager(load_entrypoints=True)
    assert manager.model_formats.get("gguf") is GGUFFormat
    assert manager.quantization_methods.get("gguf") is GGUFLinearMethod


def test_light_llama_config_runs_through_the_transformers_fallback(
    tiny_model_dir: Callable[..., Path], out_dir: Path
) -> None:
    """The Llama GGUF's light config (kvik_gguf.hf_configs) becomes transformers' LlamaConfig where
    transformers' own code needs it: the fallback decodes the same tokens as the native model."""
    import kvik

    model_dir = tiny_model_dir("llama")
    path = str(write_gguf(model_dir, out_dir / "fallback.gguf", "F32"))
    prompts = [{"prompt_token_ids": [1, 5, 9, 200, 31]}, {"prompt_token_ids": [7, 7, 3]}]
    params = kvik.SamplingParams(max_tokens=6, temperature=0)

    def run(**kwargs: Any) -> list[list[int]]:
        llm = kvik.LLM(path, dtype="float32", max_model_len=64, **kwargs)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert run(model_impl="transformers") == run()


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_embedding_decodes_into_its_parameter(
    tied: bool, tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """A Q8_0 token embedding (SmolLM2's) and head come as blocks in quantized mode; the loader decodes them
    into the model's bfloat16 parameters, with the values of the dense decode cast to bfloat16."""
    import kvik

    model_dir = tiny_model_dir("llama", tie_word_embeddings=tied)
    types = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q8_0"}
    fmt = GGUFFormat(str(write_gguf(model_dir, tmp_path / "emb.gguf", "Q8_0", tensor_types=types)))
    dense = dict(fmt.iter_weights(quantized=False))
    packed = dict(fmt.iter_weights(quantized=True))
    assert isinstance(packed["model.embed_tokens.weight"], GGUFWeight)
    assert isinstance(packed["lm_head.weight"], GGUFWeight)
    assert ("lm_head.weight" in dense) is not tied

    llm = kvik.LLM(str(fmt.path), device="cpu", dtype="bfloat16", num_kv_blocks=64)
    model = llm.llm_engine.runner.model
    module = model.model.embed_tokens
    want = dense["model.embed_tokens.weight"].to(torch.bfloat16)
    if tied and want.shape[0] % 64 == 0 and int4pack.layout_understood():
        # The packed tied head serves the lookups: the embedding holds no dense copy, its rows are the same bits.
        assert module.weight.is_meta and module.packed_rows is not None
        assert torch.equal(module(torch.arange(want.shape[0]).reshape(2, -1)), want.reshape(2, -1, want.shape[1]))
    embedding = module.dense_weight  # decoded back on demand (a dense consumer)
    assert embedding.dtype == torch.bfloat16 and not embedding.is_meta
    assert torch.equal(embedding, want)
    if not tied:
        assert torch.equal(model.lm_head.weight, dense["lm_head.weight"].to(torch.bfloat16))
    out = torch.empty(3, 5)
    with pytest.raises(ValueError, match="cannot fill a parameter of shape"):
        packed["model.embed_tokens.weight"].dequantize_into(out)


def test_one_tokenizer_per_caller_kept_in_the_process_only_without_a_disk_cache(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each engine loads its own tokenizer from kvik's disk cache; the process keeps none (a kept one plus a copy
    per engine held two). Only when the cache cannot be written is the built one kept, and copied per caller."""
    from kvik_gguf import tokenizer as gguf_tokenizer

    fmt = GGUFFormat(str(write_gguf(tiny_model_dir("llama"), tmp_path / "tok.gguf", "F32")))
    builds: list[str] = []
    real_build = gguf_tokenizer._build

    def counting_build(path: str, meta: Any) -> Any:
        builds.append(path)
        return real_build(path, meta)

    monkeypatch.setattr(gguf_tokenizer, "_build", counting_build)
    monkeypatch.setattr(gguf_tokenizer, "_BUILT", {})
    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path / "cache"))
    first, second = fmt.load_tokenizer(), fmt.load_tokenizer()
    assert len(builds) == 1 and gguf_tokenizer._BUILT == {} and first is not second

    blocked = tmp_path / "a-file-not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("KVIK_CACHE_DIR", str(blocked))  # the cache cannot be written here
    third, fourth = fmt.load_tokenizer(), fmt.load_tokenizer()
    assert len(builds) == 2 and len(gguf_tokenizer._BUILT) == 1 and third is not fourth
    text = "Hello world, 2024!"
    assert first.encode(text) == second.encode(text) == third.encode(text) == fourth.encode(text)
    # The cached copy loads through the class its config names, not AutoTokenizer: the same tokenizer.
    assert type(second) is type(first)
    assert (second.bos_token_id, second.eos_token_id, second.chat_template) == (
        first.bos_token_id,
        first.eos_token_id,
        first.chat_template,
    )


def test_a_cached_tokenizer_naming_an_unknown_class_loads_through_auto_tokenizer(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from kvik_gguf import tokenizer as gguf_tokenizer

    fmt = GGUFFormat(str(write_gguf(tiny_model_dir("llama"), tmp_path / "tok.gguf", "F32")))
    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path / "cache"))
    built = fmt.load_tokenizer()
    (config_path,) = (tmp_path / "cache").rglob("tokenizer_config.json")
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "NoSuchTokenizerClass"
    config_path.write_text(json.dumps(config))
    again = gguf_tokenizer._load_saved(config_path.parent)
    assert again.encode("Hello world") == built.encode("Hello world")
