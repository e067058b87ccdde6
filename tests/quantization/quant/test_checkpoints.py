"""Quantized checkpoints end to end: kvik's greedy tokens against transformers running the dequantized model in fp32.

* ``quantized_weights="dequantize"``: kvik runs the same dense weights as the reference, so tokens are identical.
* packed (``"quantized"``): INT4 runs the torch reference kernel path; FP8 W8A8 also quantizes activations
  (emulated on CPU with KVIK_QUANT_EMULATE=1), so tokens may diverge once, vLLM-style: at the first
  difference each side's token is in the other's top 5 (vLLM's quantization tests use 5 too: this random
  model's top tokens are often within 0.1 nats, less than e4m3 activations move them) and the logprobs
  there are close.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kvik
import pytest
import quant_checkpoints as ckpt
import torch
from kvik import SamplingParams
from kvik.testing.reference import random_prompts

PROMPTS = random_prompts(3, seed=5, low=4, high=24)
NEW_TOKENS = 10
TOP = 5  # logprobs kept per step
TINY = dict(hidden_size=256, intermediate_size=512)  # 128-wide groups and blocks fit


def _kvik(model: Path, **kwargs: object) -> list[tuple[list[int], list[dict[int, float]]]]:
    llm = kvik.LLM(str(model), device="cpu", dtype="float32", num_kv_blocks=64, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    return [(list(o.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.logprobs]) for o in outs]


def _hf(model: Path) -> list[tuple[list[int], list[dict[int, float]]]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)  # fmt: skip
            steps = []
            for scores in out.scores:
                lp = torch.log_softmax(scores[0].float(), -1)
                top = torch.topk(lp, TOP)
                steps.append({int(i): float(v) for v, i in zip(top.values, top.indices, strict=True)})
            results.append((out.sequences[0, len(prompt) :].tolist(), steps))
    return results


def _assert_close(got: list, ref: list, tol: float, top: int) -> int:
    """vLLM's check_logprobs_close with the top ``top``: returns how many sequences diverged (after a close call)."""
    diverged = 0
    for i, ((tokens, lps), (ref_tokens, ref_lps)) in enumerate(zip(got, ref, strict=True)):
        for pos, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)):
            if a == b:
                continue
            ref_top = sorted(ref_lps[pos], key=ref_lps[pos].__getitem__, reverse=True)[:top]
            got_top = sorted(lps[pos], key=lps[pos].__getitem__, reverse=True)[:top]
            assert a in ref_top and b in got_top, f"prompt {i} step {pos}: {a} vs {b} not in each other's top {top}"
            assert abs(lps[pos][a] - ref_lps[pos][a]) < tol, f"prompt {i} step {pos}: logprobs far apart"
            diverged += 1
            break
    return diverged


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """name -> (quantized checkpoint, its dequantized float32 copy), built once per module."""
    from kvik.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("quant_ckpts")
    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            if name.startswith("ct_"):
                path = ckpt.fixture(name, root / name)
            elif name == "hf_fp8_block":
                path = ckpt.write_hf_fp8_block(ckpt.FIXTURES / "ct_fp8_block", root / name)
            else:
                dense = root / "dense"
                if not dense.exists():
                    make_tiny_model(dense, seed=3, **TINY)
                kind, group, *act = name.split("_")
                if kind == "gptq":
                    path = ckpt.write_gptq(dense, root / name, int(group[1:]), act_order=bool(act))
                else:
                    path = ckpt.write_awq(dense, root / name, int(group[1:]))
            built[name] = (path, ckpt.dequantized(path, root / f"{name}_dense"))
        return built[name]

    return get


ALL = ["ct_fp8_dynamic", "ct_fp8_static", "ct_fp8_block", "hf_fp8_block", "ct_w4a16_g128", "ct_w4a16_asym_g128",
       "gptq_g128", "gptq_g32_actorder", "awq_g64", "ct_int8_w8a8"]  # fmt: skip
FP8 = {"ct_fp8_dynamic", "ct_fp8_static", "ct_fp8_block", "hf_fp8_block"}
W8A8 = FP8 | {"ct_int8_w8a8"}  # activations quantized too
# The packed run costs most (the CPU reference dequantizes every call): one per code path, not all nine.
PACKED = {"ct_fp8_dynamic", "ct_fp8_static", "hf_fp8_block", "ct_w4a16_asym_g128", "gptq_g32_actorder", "awq_g64",
          "ct_int8_w8a8"}  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_matches_dequantized_transformers(
    name: str, checkpoints: Callable[[str], tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, dense = checkpoints(name)
    ref = _hf(dense)
    got_dense = _kvik(path, quantized_weights="dequantize")
    assert [t for t, _ in got_dense] == [t for t, _ in ref], "dense weights: tokens must be identical"
    if name not in PACKED:
        return
    if name in FP8:
        monkeypatch.setenv("KVIK_QUANT_EMULATE", "1")
    packed = _kvik(path, quantized_weights="quantized")
    if name in W8A8:  # e4m3 activations move this random model's logprobs by up to ~0.2 (static scales
        # calibrated on other random tokens clip some activations: up to ~0.45)
        _assert_close(packed, ref, tol=0.6 if "static" in name else 0.3, top=5)
    else:  # weight-only: the same weights, only the order of float32 sums differs
        assert _assert_close(packed, ref, tol=1e-3, top=2) == 0


def test_fp8_checkpoint_refused_packed_on_cpu(checkpoints: Callable[[str], tuple[Path, Path]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("KVIK_QUANT_EMULATE", raising=False)
    path, _ = checkpoints("ct_fp8_dynamic")
    with pytest.raises(ValueError, match=r"'fp8' \(FP8 W8A8\) cannot run on cpu.*quantized_weights='dequantize'"):
        kvik.LLM(str(path), device="cpu", quantized_weights="quantized")
