"""Structured output end to end: every output of a random-weight model satisfies its constraint.

A random tiny model left alone almost never writes valid JSON; with the
grammar mask every sample must finish (finish_reason "stop": the grammar
terminated) and parse / validate / match. Invalid constraints fail at
admission with ValueError carrying the compiler's message.
"""

from __future__ import annotations

import json
import re

import pytest
from kvik import LLM, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SAMPLES = 6
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["age", "ok", "color"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 4},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "boolean"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "label": {"type": "string", "maxLength": 6},
        },
        "required": ["point", "label"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    path = tiny_model_dir(arch="llama")
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=256, block_size=16, max_num_seqs=16)


def generate(llm: LLM, max_tokens: int = 120, **guided) -> list:
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, **guided) for s in range(SAMPLES)]
    outputs = [o.outputs[0] for o in llm.generate([[1, 2, 3]] * SAMPLES, params)]
    assert [c.finish_reason for c in outputs] == ["stop"] * SAMPLES, [c.text for c in outputs]
    return outputs


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("as_string", [False, True], ids=["dict", "str"])
def test_json_schema_outputs_validate(llm, name, as_string) -> None:
    schema = SCHEMAS[name]
    for completion in generate(llm, guided_json=json.dumps(schema) if as_string else schema):
        jsonschema.validate(json.loads(completion.text), schema)


@pytest.mark.parametrize("pattern", [r"\d{3}-[a-z]{2,4}", r"(yes|no|maybe)!", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5})?"])
def test_regex_outputs_match(llm, pattern) -> None:
    for completion in generate(llm, max_tokens=40, guided_regex=pattern):
        assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_outputs_are_choices(llm) -> None:
    choices = ["positive", "negative", 'a "quoted" one', "naïve"]
    texts = {c.text for c in generate(llm, max_tokens=40, guided_choice=choices)}
    assert texts <= set(choices)


def test_ebnf_grammar_outputs_parse(llm) -> None:
    grammar = 'root ::= "<" item ("," item)? ">"\nitem ::= [a-z] [0-9]'
    for completion in generate(llm, max_tokens=40, guided_grammar=grammar):
        assert re.fullmatch(r"<[a-z][0-9](,[a-z][0-9])?>", completion.text), completion.text


def test_n_samples_each_follow_the_grammar(llm) -> None:
    out = llm.generate([[5, 6]], SamplingParams(n=4, seed=1, max_tokens=40, guided_regex=r"[ab]{2}\d"))[0]
    assert [c.finish_reason for c in out.outputs] == ["stop"] * 4
    assert all(re.fullmatch(r"[ab]{2}\d", c.text) for c in out.outputs)


@pytest.mark.parametrize(
    "guided,message",
    [
        (dict(guided_grammar="root ::= ( "), "invalid guided_grammar"),
        (dict(guided_regex="(unclosed"), "invalid guided_regex"),
        (dict(guided_json='{"type": "object",'), "invalid guided_json: not valid JSON"),
        (dict(guided_json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "invalid guided_json"),
    ],
)
def test_invalid_constraints_fail_at_admission(llm, guided, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, **guided))
    assert not llm.llm_engine.has_unfinished_requests()


def test_compiled_grammars_are_cached(llm, monkeypatch) -> None:
    structured = llm.llm_engine.structured
    calls = []
    backend = structured.backend
    original = backend.compile
    monkeypatch.setattr(backend, "compile", lambda kind, spec: calls.append(kind) or original(kind, spec))
    regex = r"cache-test-[xy]"
    for _ in range(3):
        llm.generate([[1, 2]], SamplingParams(max_tokens=20, guided_regex=regex))
    assert calls == ["regex"]


def test_json_object_outputs_are_objects(llm) -> None:
    # Free-form objects may hold unbounded strings a random model never closes: check the
    # ones the grammar ended (most of them), and that the rest only ran out of tokens.
    params = [SamplingParams(max_tokens=60, seed=s, guided_json_object=True) for s in range(8)]
    outputs = [o.outputs[0] for o in llm.generate([[1, 2, 3]] * 8, params)]
    done = [c for c in outputs if c.finish_reason == "stop"]
    assert len(done) >= 4 and all(c.finish_reason == "length" for c in outputs if c not in done)
    assert all(isinstance(json.loads(c.text), dict) for c in done)


def test_runners_without_grammar_support_refuse_constraints(llm, monkeypatch) -> None:
    # The runners' ability, as the engine's input processor read it at start.
    monkeypatch.setattr(llm.llm_engine.inputs, "structured_output", False)
    with pytest.raises(ValueError, match=r"structured output .* is not supported by the cpu platform"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=4, guided_regex="a+"))


def test_the_grammar_ends_the_request_even_with_ignore_eos(llm) -> None:
    # With ignore_eos the scheduler would not stop on EOS: the grammar's termination does.
    out = llm.generate([[1, 2]], SamplingParams(max_tokens=40, ignore_eos=True, guided_choice=["alpha", "beta"]))
    completion = out[0].outputs[0]
    assert completion.finish_reason == "stop" and completion.text in ("alpha", "beta")
    assert len(completion.token_ids) < 40


def test_properties_come_in_the_schemas_order(llm) -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
        "required": ["zeta", "alpha"],
        "additionalProperties": False,
    }
    for completion in generate(llm, max_tokens=40, guided_json=schema):
        assert list(json.loads(completion.text)) == ["zeta", "alpha"]


def test_outputs_stay_utf8_when_the_model_pushes_for_surrogates(llm) -> None:
    # xgrammar alone lets ED A0 A0 (U+D820, a surrogate: not UTF-8) count as one string character: this
    # bias made the string 12 U+FFFD against maxLength 4. Guarded, A0 is masked right after ED, so 80
    # wins there and A0 after it: ED 80 A0 is U+D020.
    xgrammar = pytest.importorskip("xgrammar")
    info = xgrammar.TokenizerInfo.from_huggingface(llm.get_tokenizer(), vocab_size=512)
    byte_token = {data[0]: t for t, data in enumerate(info.decoded_vocab) if len(data) == 1}
    schema = {"type": "object", "properties": {"t": {"type": "string", "maxLength": 4}}, "required": ["t"]}
    bias = {byte_token[0xED]: 100.0, byte_token[0xA0]: 100.0, byte_token[0x80]: 50.0}
    json_schema = StructuredOutputsParams(json=schema)
    params = SamplingParams(max_tokens=40, temperature=0.0, logit_bias=bias, structured_outputs=json_schema)
    completion = llm.generate([[1, 2, 3]], params)[0].outputs[0]
    assert completion.finish_reason == "stop"
    generated = [t for t in completion.token_ids if t not in info.stop_token_ids]
    text = b"".join(info.decoded_vocab[t] for t in generated).decode("utf-8")  # strict: raises on invalid bytes
    assert text == completion.text == '{"t": "' + chr(0xD020) * 4 + '"}'  # U+D020: a Hangul syllable
    jsonschema.validate(json.loads(text), schema)
