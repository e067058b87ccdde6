"""The OpenAI API through the official `openai` client against a live server with a tiny random model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from server_harness import MAX_MODEL_LEN, ServerProcess

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a story."},
    {"role": "assistant", "content": "Once upon a time"},
    {"role": "user", "content": "Go on."},
]
GREEDY = {"temperature": 0.0}


def prompt_len(server: ServerProcess, **body: object) -> int:
    with server.client() as c:
        return int(c.post("/tokenize", json=body).json()["count"])


def test_models_version_health(server: ServerProcess) -> None:
    models = server.openai().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    card = models.data[0].model_dump()
    assert card["max_model_len"] == MAX_MODEL_LEN and card["owned_by"] == "kvik"
    with server.client() as c:
        assert c.get("/health").status_code == 200
        ready = c.get("/ready")
        assert ready.status_code == 200, ready.text
        assert "version" in c.get("/version").json()


def test_completion_and_usage(server: ServerProcess) -> None:
    client = server.openai()
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7,
                                    extra_body={"ignore_eos": True}, **GREEDY)  # fmt: skip
    assert out.object == "text_completion" and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.usage.prompt_tokens == prompt_len(server, prompt="The quick brown fox")
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    # the same request streamed gives the same text, chunk by chunk
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}, **GREEDY))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_prompt_shapes_and_echo(server: ServerProcess) -> None:
    client = server.openai()
    with server.client() as c:
        ids = c.post("/tokenize", json={"prompt": "Hello world!"}).json()["tokens"]
    by_text = client.completions.create(model="tiny", prompt="Hello world!", max_tokens=5, **GREEDY)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="tiny", prompt=["Hello world!", "Paged attention"], max_tokens=5, n=2,
                                     **GREEDY)  # fmt: skip
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert {c.text for c in many.choices if c.index < 2} == {by_text.choices[0].text}
    token_lists = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=3, **GREEDY)
    assert len(token_lists.choices) == 2 and token_lists.usage.prompt_tokens == len(ids) + 2
    echo = client.completions.create(model="tiny", prompt="Hello world!", max_tokens=5, echo=True, **GREEDY)
    assert echo.choices[0].text == "Hello world!" + by_text.choices[0].text
    stream = client.completions.create(model="tiny", prompt="Hello world!", max_tokens=5, echo=True, stream=True,
                                       **GREEDY)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == echo.choices[0].text


def test_chat_stream_matches_non_stream_and_sse_format(server: ServerProcess) -> None:
    client = server.openai()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, **GREEDY)
    assert full.object == "chat.completion"
    message = full.choices[0].message
    assert message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == prompt_len(server, messages=MESSAGES)
    assert full.usage.completion_tokens <= 12
    # raw SSE: role delta first, content deltas, finish chunk, usage chunk, [DONE]
    body = {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}  # fmt: skip
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["delta"] == {}
    assert finish[0]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == full.usage.completion_tokens
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == message.content


def test_stop_string(server: ServerProcess) -> None:
    client = server.openai()
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24,
                                     extra_body={"ignore_eos": True}, **GREEDY).choices[0].text  # fmt: skip
    stop = next(
        (base[i : i + 2] for i in range(3, len(base) - 2) if base[i : i + 2].strip() and "�" not in base[i : i + 2]),
        None,
    )
    if stop is None:
        pytest.skip(f"greedy output has no usable stop string: {base!r}")
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, stop=[stop],
                                    extra_body={"ignore_eos": True}, **GREEDY).choices[0]  # fmt: skip
    assert cut.finish_reason == "stop"
    assert cut.text == base[: base.index(stop)]
    kept = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
                                     **GREEDY).choices[0]  # fmt: skip
    assert kept.text == base[: base.index(stop) + len(stop)]


def test_seed_reproducible_and_n(server: ServerProcess) -> None:
    client = server.openai()

    def sample(seed: int, n: int = 1) -> list[str]:
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                             seed=seed, n=n, extra_body={"ignore_eos": True})  # fmt: skip
        assert [c.index for c in out.choices] == list(range(n))
        assert out.usage.completion_tokens == 10 * n
        return [c.message.content for c in out.choices]

    assert sample(7) == sample(7)
    assert len({sample(s)[0] for s in (1, 2, 3, 4)}) > 1  # a random model at T=1 is not constant
    three = sample(11, n=3)
    assert three == sample(11, n=3)
    # streamed n>1: every choice gets its role delta, content and exactly one finish chunk
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=11,
                                            n=3, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    texts, finishes = ["", "", ""], [0, 0, 0]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] += c.finish_reason is not None
    assert texts == three and finishes == [1, 1, 1]


def test_tokenize_detokenize(server: ServerProcess) -> None:
    with server.client() as c:
        tok = c.post("/tokenize", json={"model": "tiny", "prompt": "Hello world!"}).json()
        assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
        assert c.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world!"}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        text = c.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert c.post("/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_extras_accepted_and_sampling_errors(server: ServerProcess) -> None:
    client = server.openai()
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=4, temperature=0.8,
        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [2],
                    "skip_special_tokens": True, "priority": 0, "ignore_eos": False},
    )  # fmt: skip
    assert out.usage.completion_tokens >= 2
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "top_p": 1.5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        # neutral values of unsupported OpenAI fields are fine (some clients always send them)
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "tools": [], "logprobs": False,
                                                 "response_format": {"type": "text"}, "user": "u1"})  # fmt: skip
        assert r.status_code == 200, r.text


def test_metrics_after_traffic(server: ServerProcess) -> None:
    server.openai().completions.create(model="tiny", prompt="metrics", max_tokens=3, **GREEDY)
    metrics = server.metrics()
    for name in ("kvik:num_requests_running", "kvik:num_requests_waiting", "kvik:kv_cache_usage_perc",
                 "kvik:prefix_cache_hit_rate", "kvik:num_preemptions_total", "kvik:prompt_tokens_total",
                 "kvik:generation_tokens_total"):  # fmt: skip
        assert name in metrics, name
    assert metrics["kvik:generation_tokens_total"] >= 3
    assert metrics["kvik:time_to_first_token_seconds_count"] >= 1
    assert metrics["kvik:time_per_output_token_seconds_count"] >= 1
    assert metrics["kvik:e2e_request_latency_seconds_count"] >= 1
    assert httpx.get(server.base_url + "/metrics").status_code == 200  # open without the key


def test_logprobs_match_offline(server: ServerProcess, tiny_model: Path) -> None:
    from kvik.entrypoints.llm import LLM
    from kvik.sampling_params import SamplingParams

    client = server.openai()
    out = client.completions.create(model="tiny", prompt="Paged attention", max_tokens=6, logprobs=3,
                                    extra_body={"ignore_eos": True}, **GREEDY).choices[0]  # fmt: skip
    llm = LLM(model=str(tiny_model), device="cpu", max_model_len=MAX_MODEL_LEN, num_threads=1)
    ref = llm.generate("Paged attention", SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True))
    ref_values = [
        position[token].logprob
        for position, token in zip(ref[0].outputs[0].logprobs, ref[0].outputs[0].token_ids, strict=True)
    ]
    lp = out.logprobs
    assert lp is not None and len(lp.token_logprobs) == 6
    assert lp.token_logprobs == pytest.approx(ref_values, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(chosen)  # greedy picks the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # chat: OpenAI's logprobs.content entries, also when streamed
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True}, **GREEDY)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, stream=True,
                                            extra_body={"ignore_eos": True}, **GREEDY)  # fmt: skip
    streamed = [e.logprob for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content])
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "top_logprobs": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_structured_output(server: ServerProcess) -> None:
    client = server.openai()
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                            extra_body={"guided_choice": ["yes", "no"]}, **GREEDY)  # fmt: skip
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(model="tiny", prompt="Number:", max_tokens=10,
                                      extra_body={"guided_regex": "[0-9]{3}"}, **GREEDY)  # fmt: skip
    assert re.fullmatch("[0-9]{3}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, response_format=fmt,
                                         **GREEDY).choices[0]  # fmt: skip
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.message.content)["ok"], bool)
    else:  # a random model may pad with whitespace until max_tokens; what it wrote still follows the schema
        assert out.message.content.lstrip().startswith("{")
    with server.client() as c:
        both = {"messages": MESSAGES, "guided_regex": "a", "guided_choice": ["a"]}
        assert c.post("/v1/chat/completions", json=both).status_code == 400
