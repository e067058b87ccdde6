"""LLM.beam_search against transformers' beam search (num_beams, do_sample=False) on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik import LLM, BeamSearchParams
from kvik.entrypoints.beam_search import beam_score, beam_search
from kvik.outputs import CompletionOutput, Logprob, RequestOutput
from kvik.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 99], [7, 8, 9], [300, 12]]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama", seed=3)


def _hf_beams(path, prompt, width, new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), num_beams=width,
        num_return_sequences=width, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
        early_stopping=False, length_penalty=1.0, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    return [seq[len(prompt) :].tolist() for seq in out.sequences], out.sequences_scores.tolist()


@pytest.mark.parametrize("width", [2, 4])
def test_beams_match_transformers(path, width):
    llm = LLM(str(path), device="cpu", num_kv_blocks=256, max_model_len=128)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                              BeamSearchParams(beam_width=width, max_tokens=6, ignore_eos=True))  # fmt: skip
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected, hf_scores = _hf_beams(path, prompt, width, 6)
        got = [s.tokens[len(prompt) :] for s in output.sequences]
        assert got == expected
        for seq, hf_score in zip(output.sequences, hf_scores, strict=True):
            assert seq.tokens[: len(prompt)] == prompt and len(seq.logprobs) == 6
            # transformers divides by the generated length; kvik (like vLLM) ranks by the full length.
            assert seq.cum_logprob / 6 == pytest.approx(hf_score, abs=1e-3)
            assert seq.finish_reason == "length"
            assert seq.text == llm.get_tokenizer().decode(seq.tokens, skip_special_tokens=True)


def _fake_generate(table):
    """A generate() whose next-token log-probs come from ``table[last token]``."""

    def generate(batch, params: SamplingParams):
        outs = []
        for i, tokens in enumerate(batch):
            cands = {t: Logprob(math.log(p)) for t, p in table[tokens[-1]].items()}
            best = max(cands, key=lambda t: cands[t].logprob)
            completion = CompletionOutput(0, "", [best], logprobs=[cands], finish_reason="length")
            outs.append(RequestOutput(str(i), None, list(tokens), [completion], True))
        return outs

    return generate


def test_eos_finishes_a_beam_and_length_penalty_ranks_finished_beams():
    eos = 0
    # From 1: EOS is likeliest (0.5), then 2 (0.3) and 3 (0.2); 2 and 3 continue with certainty.
    table = {1: {0: 0.5, 2: 0.3, 3: 0.2}, 2: {4: 1.0}, 3: {4: 1.0}, 4: {4: 1.0}, 0: {4: 1.0}}
    gen = _fake_generate(table)
    # length_penalty=0 ranks by cumulative log-prob: the finished [1, EOS] (log 0.5) wins.
    by_sum = beam_search(gen, [[1]], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0.0),
                         frozenset({eos}), 64)[0]  # fmt: skip
    assert [s.tokens for s in by_sum.sequences] == [[1, 0], [1, 2, 4, 4]]
    assert by_sum.sequences[0].finish_reason == "stop" and by_sum.sequences[0].stop_reason == eos
    # The default (1.0) divides by the length (prompt included, EOS not): log(0.3) / 4 > log(0.5) / 1.
    per_token = beam_search(gen, [[1]], BeamSearchParams(beam_width=2, max_tokens=3), frozenset({eos}), 64)[0]
    assert [s.tokens for s in per_token.sequences] == [[1, 2, 4, 4], [1, 3, 4, 4]]
    # ignore_eos: EOS is an ordinary token.
    ignoring = beam_search(gen, [[1]], BeamSearchParams(beam_width=1, max_tokens=2, ignore_eos=True),
                           frozenset({eos}), 64)  # fmt: skip
    assert ignoring[0].sequences[0].tokens[:2] == [1, 0]
    assert beam_score([1, 0], math.log(0.5), frozenset({0}), 1.0) == pytest.approx(math.log(0.5))


def test_bad_beam_search_params_are_clear_errors():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)


# A random "model": next-token distributions over 6 tokens (token 0 is EOS), keyed by the last token.
rows = st.lists(st.floats(0.01, 1.0), min_size=6, max_size=6).map(lambda w: {t: x / sum(w) for t, x in enumerate(w)})
tables = st.lists(rows, min_size=6, max_size=6).map(lambda r: dict(enumerate(r)))


@settings(max_examples=60, deadline=None)
@given(table=tables, width=st.integers(1, 4), steps=st.integers(1, 5), ignore_eos=st.booleans(),
       penalty=st.sampled_from([0.0, 1.0, 2.0]))  # fmt: skip
def test_beam_search_invariants(table, width, steps, ignore_eos, penalty):
    params = BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=ignore_eos, length_penalty=penalty)
    eos = frozenset({0})
    out = beam_search(_fake_generate(table), [[3]], params, eos, 64)[0].sequences
    assert 1 <= len(out) <= width
    scores = [beam_score(s.tokens, s.cum_logprob, frozenset() if ignore_eos else eos, penalty) for s in out]
    assert scores == sorted(scores, reverse=True)
    for seq in out:
        assert seq.tokens[0] == 3 and 2 <= len(seq.tokens) <= steps + 1
        logprob = sum(math.log(table[a][b]) for a, b in zip(seq.tokens, seq.tokens[1:], strict=False))
        assert seq.cum_logprob == pytest.approx(logprob)
        ended = not ignore_eos and seq.tokens[-1] == 0
        assert (seq.finish_reason == "stop") == ended and (ended or len(seq.tokens) == steps + 1)
        assert ignore_eos or 0 not in seq.tokens[1:-1]  # EOS only ever ends a beam
    if width == 1 and ignore_eos:  # one beam with no finished list is greedy decoding
        greedy = [3]
        for _ in range(steps):
            greedy.append(max(table[greedy[-1]], key=table[greedy[-1]].get))
        assert out[0].tokens == greedy
