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


@pytest.mark.parametrize("qtype, tied", [("Q8_0", False), ("Q4_1", True), ("Q4_0", False)])
def test_a_gguf_exports_its_own_blocks(tmp_path: Path, qtype: str, tied: bool) -> None:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks go into MatMulNBits unchanged (onnx_exact_blocks), so with float32
    activations ONNX Runtime decodes token for token like kvik on the GGUF's dequantized weights; the
    builder's own re-quantization did not. Tied embeddings (SmolLM2's) load too: the lm_head is its own
    MatMulNBits, not shared with the Gather."""
    import onnx
    from kvik.entrypoints.export_onnx import export_onnx
    from kvik.testing.tiny_models import make_tiny_model

    convert = pytest.importorskip("kvik_gguf.convert", reason="the GGUF plugin is not installed")
    model = make_tiny_model(tmp_path / "llama", "llama", tie_word_embeddings=tied)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"  # a Q8_0 head, as SmolLM2's file has
    gguf = convert.write_gguf(model, tmp_path / f"tiny.{qtype}.gguf", qtype, tensor_types={head: "Q8_0"})
    report = export_onnx(str(gguf), tmp_path / "onnx", builder_options={"accuracy_level": "1"})
    assert report.precision == "int4" and report.source_quantization == "gguf"
    bits = 8 if qtype == "Q8_0" else 4
    expected = {4: 10, 8: 1} if bits == 4 else {8: 11}
    assert sorted(report.notes) == sorted(
        f"note: {n} MatMulNBits weights carry the source's {b}-bit blocks exactly" for b, n in expected.items()
    )
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = {node.name: node for node in graph.node if node.op_type == "MatMulNBits"}
    assert len(nbits) == 2 * 5 + 1 and any("lm_head" in name for name in nbits)  # qkv, o, gate, up, down; head
    layer_bits = {a.i for node in nbits.values() if "layers" in node.name for a in node.attribute if a.name == "bits"}
    assert layer_bits == {bits}
    # Q4_1's minimums are not whole steps: they are added after the product (a ReduceSum per distinct input)
    assert sum(node.op_type == "ReduceSum" for node in graph.node) == (2 * 4 if qtype == "Q4_1" else 0) + 1
    # The logits agree to float32 rounding, not to a re-quantization's error: ONNX Runtime under kvik's engine
    # (the CPU platform's onnx_model) against kvik on the GGUF's dequantized weights, same prompts, one step.
    import kvik

    rt = report.round_trip
    assert rt is not None
    params = kvik.SamplingParams(temperature=0.0, max_tokens=1, logprobs=5, ignore_eos=True, detokenize=False)
    common = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64)
    firsts = {}
    for name, extra in (("torch", {"quantized_weights": "dequantize"}),
                        ("onnx", {"platform_options": {"onnx_model": str(tmp_path / "onnx")}})):  # fmt: skip
        llm = kvik.LLM(str(gguf), **common, **extra)
        firsts[name] = [o.outputs[0].logprobs[0] for o in llm.generate(rt.prompts, params, use_tqdm=False)]
        del llm
    for ours, theirs in zip(firsts["torch"], firsts["onnx"], strict=True):
        assert list(ours) == list(theirs)  # the same top five, in order
        assert max(abs(ours[t].logprob - theirs[t].logprob) for t in ours) < 1e-4
    # Greedy continuations mostly agree too (a near-tie of this random model may still flip late).
    assert sum(rt.onnx_tokens[i] == rt.kvik_tokens[i] for i in range(3)) >= 2, rt.first_divergences()


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    from kvik.entrypoints.cli import main
    from kvik.testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", "llama")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    assert main(["export", "onnx", "--model", str(model), "-o", str(occupied)]) == 2
    assert main(["export", "onnx", "--model", str(model), "-o", str(tmp_path / "o"), "--builder-option", "nokey"]) == 2
