"""``kvik export onnx``: ONNX Runtime GenAI greedy-decodes the same tokens as kvik on the exported weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai", reason="the onnx extra (pip install 'kvik[onnx]') is not installed")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_export_round_trips_token_for_token(arch: str, tmp_path: Path) -> None:
    from kvik.entrypoints.export_onnx import export_onnx
    from kvik.testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / arch, arch)
    report = export_onnx(str(model), tmp_path / "onnx")
    assert report.precision == "fp32" and report.checker_passed
    assert report.round_trip is not None
    assert report.round_trip.identical, report.round_trip.first_divergences()
    assert all(len(t) == 16 for t in report.round_trip.onnx_tokens)
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    # ONNX Runtime GenAI's KV layout: one past/present pair per layer, named by index
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["num_hidden_layers"] == 2 and (tmp_path / "onnx" / "tokenizer.json").is_file()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_gguf_exports_as_int4_matmulnbits(tmp_path: Path, tied: bool) -> None:
    """A Q8_0 GGUF (written by gguf-py from a tiny Llama) becomes int4 MatMulNBits by default; its first
    greedy tokens stay among kvik's best on the GGUF's dequantized weights (re-quantizing is not lossless).
    Tied embeddings (SmolLM2's) load too: the lm_head is its own MatMulNBits, not shared with the Gather."""
    import onnx
    from kvik.entrypoints.export_onnx import export_onnx, onnx_greedy
    from kvik.testing.tiny_models import make_tiny_model

    convert = pytest.importorskip("kvik_gguf.convert", reason="the GGUF plugin is not installed")
    model = make_tiny_model(tmp_path / "llama", "llama", tie_word_embeddings=tied)
    gguf = convert.write_gguf(model, tmp_path / "tiny.Q8_0.gguf", "Q8_0")
    report = export_onnx(str(gguf), tmp_path / "onnx")
    assert report.precision == "int4" and report.source_quantization == "gguf"
    assert any("re-quantized" in note for note in report.notes)  # tied or not, the summary says it is not exact
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [node.name for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1  # qkv, o, gate, up, down per layer, and the head
    assert any("lm_head" in name for name in nbits)
    rt = report.round_trip
    assert rt is not None and len(rt.onnx_tokens) == 3
    # int4 noise may flip near-ties of this random model: ONNX Runtime's first token is among kvik's top 5
    import kvik

    llm = kvik.LLM(str(gguf), device="cpu", dtype="float32", quantized_weights="dequantize", num_kv_blocks=64,
                   max_model_len=256)  # fmt: skip
    params = kvik.SamplingParams(temperature=0.0, max_tokens=1, logprobs=5, ignore_eos=True)
    for out, onnx_tokens in zip(llm.generate(rt.prompts, params, use_tqdm=False), rt.onnx_tokens, strict=True):
        assert onnx_tokens[0] in out.outputs[0].logprobs[0]
    assert onnx_greedy(tmp_path / "onnx", rt.prompts[:1], 4)[0] == rt.onnx_tokens[0][:4]


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    from kvik.entrypoints.cli import main
    from kvik.testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", "llama")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    assert main(["export", "onnx", "--model", str(model), "-o", str(occupied)]) == 2
    assert main(["export", "onnx", "--model", str(model), "-o", str(tmp_path / "o"), "--builder-option", "nokey"]) == 2
