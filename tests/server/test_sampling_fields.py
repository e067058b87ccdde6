"""vLLM's extra sampling fields through the HTTP API: allowed_token_ids, bad_words, prompt_logprobs,
and structured-output compile errors as 400s carrying the compiler's message."""

from __future__ import annotations

import math
from typing import Any

import pytest
from server_harness import ServerProcess

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


def _token_id(server: ServerProcess, text: str) -> int:
    with server.client() as c:
        ids = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1, ids
    return ids[0]


def test_allowed_token_ids_and_bad_words(server: ServerProcess) -> None:
    a, b = _token_id(server, "a"), _token_id(server, "b")
    with server.client() as c:
        body = {"prompt": [1, 2, 3], "allowed_token_ids": [a, b], **GREEDY}
        text = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert len(text) == 6 and set(text) <= {"a", "b"}
        # Banning "a" leaves only "b".
        banned = c.post("/v1/completions", json={**body, "bad_words": ["a"]}).json()["choices"][0]["text"]
        assert banned == "bbbbbb"


def test_prompt_logprobs(server: ServerProcess) -> None:
    prompt = [5, 6, 7, 8, 9]
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "prompt_logprobs": 2, "n": 2, **GREEDY})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            positions = choice["prompt_logprobs"]
            assert positions[0] is None and len(positions) == len(prompt)
            for token, entry in zip(prompt[1:], positions[1:], strict=True):
                actual = entry[str(token)]  # the prompt token itself, then the top 2
                assert actual["logprob"] <= 0 and actual["rank"] >= 1 and 2 <= len(entry) <= 3
                ranks = sorted(e["rank"] for t, e in entry.items() if t != str(token))
                assert ranks in ([1, 2], [1, 3], [2, 3])
        chat = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 0, **GREEDY},
        ).json()
        assert chat["prompt_logprobs"][0] is None
        assert all(math.isfinite(next(iter(p.values()))["logprob"]) for p in chat["prompt_logprobs"][1:])
        streamed = c.post("/v1/completions", json={"prompt": prompt, "prompt_logprobs": 1, "stream": True, **GREEDY})
        assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_invalid_constraints_are_400_with_the_compilers_message(server: ServerProcess) -> None:
    pytest.importorskip("xgrammar")
    with server.client() as c:
        cases = [
            ({"guided_grammar": "root ::= ("}, "EBNF parser error"),
            ({"guided_regex": "(unclosed"}, "invalid guided_regex"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
             "invalid guided_json"),
        ]  # fmt: skip
        for extra, message in cases:
            r = c.post("/v1/completions", json={"prompt": "x", **GREEDY, **extra})
            assert r.status_code == 400, r.text
            assert message in r.json()["error"]["message"]
