"""`kvik run-batch`: OpenAI Batch files through the engine, answered exactly as `kvik serve` answers.

The runner's source is core/kvik/entrypoints/batch.py; its tests live here because they compare
against the server (and need its package). The file format itself: tests/core/entrypoints/test_batch_file.py.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from kvik.entrypoints.cli import main
from server_harness import MAX_MODEL_LEN, InProcessServer, ServerProcess

CPU = ["--device", "cpu", "--num-threads", "1", "--no-progress"]


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_records(path: Path) -> dict[str | None, list[dict[str, Any]]]:
    records: dict[str | None, list[dict[str, Any]]] = {}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        records.setdefault(record["custom_id"], []).append(record)
    return records


def chat(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": messages, "max_tokens": 6, "temperature": 0, **body}}  # fmt: skip


def test_outputs_equal_the_servers(smollm_server: ServerProcess, tmp_path: Path) -> None:
    """Greedy results (and refusals) from a batch are the bodies `kvik serve` returns for the same requests."""
    lines = [
        chat("chat-1", "What is the capital of France?", model="smollm2"),
        chat("chat-2", "Name a colour.", max_tokens=None, max_completion_tokens=5, stop=["."]),
        {"custom_id": "chat-sys", "method": "POST", "url": "/v1/chat/completions", "body": {
            "messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
            "max_tokens": 5, "temperature": 0}},
        {"custom_id": "cmpl-2", "url": "/v1/completions",
         "body": {"prompt": ["The sky is", "One, two,"], "max_tokens": 5, "temperature": 0, "echo": True}},
        chat("too-long", "hi", max_tokens=MAX_MODEL_LEN),
        chat("bad-field", "hi", max_token=5),
        chat("other-model", "hi", model="gpt-4o"),
    ]  # fmt: skip
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", str(source), "-o", str(out), "--served-model-name", "smollm2",
            "--max-model-len", str(MAX_MODEL_LEN), *CPU]  # fmt: skip
    assert main(args) == 0
    records = read_records(out)
    assert sorted(records, key=str) == sorted((line["custom_id"] for line in lines), key=str)
    with smollm_server.client() as client:
        for line in lines:
            (record,) = records[line["custom_id"]]
            assert record["error"] is None and record["id"].startswith("batch_req_")
            response = record["response"]
            expected = client.post(line["url"], json=line["body"])
            assert response["status_code"] == expected.status_code, line["custom_id"]
            got, want = response["body"], expected.json()
            if expected.status_code != 200:
                assert got == want and "error" in got
                continue
            assert response["request_id"] == got["id"]
            for volatile in ("id", "created"):
                got.pop(volatile), want.pop(volatile)
            assert got == want, line["custom_id"]
    assert records["chat-1"][0]["response"]["body"]["choices"][0]["message"]["content"]
    assert records["cmpl-2"][0]["response"]["body"]["choices"][1]["text"].startswith("One, two,")


def test_malformed_lines_and_resume(tiny_model_dir: Any, tmp_path: Path) -> None:
    model = str(tiny_model_dir("llama", max_position_embeddings=512))
    good = [chat(f"q{i}", f"question {i}", max_tokens=3) for i in range(4)]
    lines = [
        good[0],
        "{this is not json",
        good[1],
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "model": model}},
        {"custom_id": "q0", "url": "/v1/completions", "body": {"prompt": "dup"}},
        chat("streamed", "hi", stream=True),
        "",
        good[2],
        good[3],
    ]
    source = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", str(source), "-o", str(out), "--model", model, "--max-model-len", "512", *CPU]
    # A first run that stopped after the first three lines, mid-way through writing a record.
    write_lines(source, lines[:3])
    assert main(args) == 0
    first = read_records(out)
    assert set(first) == {"q0", "q1", None}
    out.write_text(out.read_text() + '{"id": "batch_req_x", "custom_id": "q2", "respo')

    write_lines(source, lines)
    assert main(args) == 0
    records = read_records(out)
    # Every line has exactly one record; the first run's records are kept as they were.
    assert sorted(records, key=str) == sorted(["q0", "q1", "q2", "q3", "emb", "streamed", None], key=str)
    assert records["q0"][0] == first["q0"][0] and records["q1"][0] == first["q1"][0]
    assert {k: len(v) for k, v in records.items()} == {"q0": 2, "q1": 1, "q2": 1, "q3": 1, "emb": 1, "streamed": 1,
                                                       None: 1}  # q0: its result and its duplicate's error
    (junk,) = records[None]
    assert junk["error"]["code"] == "invalid_json_line" and junk["error"]["line"] == 2
    # An embedding line runs, and a generation model refuses it as `kvik serve` does.
    assert records["emb"][0]["error"] is None and records["emb"][0]["response"]["status_code"] == 400
    assert "generation model" in records["emb"][0]["response"]["body"]["error"]["message"]
    assert records["streamed"][0]["error"]["code"] == "invalid_request"
    dup = [r for r in records["q0"] if r["error"]]
    assert len(dup) == 1 and dup[0]["error"] == {
        "code": "duplicate_custom_id", "message": "custom_id 'q0' already appeared earlier in the file", "line": 5}  # fmt: skip
    for custom_id in ("q0", "q1", "q2", "q3"):
        (ok,) = [r for r in records[custom_id] if r["response"]]
        assert ok["response"]["status_code"] == 200
        assert ok["response"]["body"]["usage"]["completion_tokens"] == 3

    # A third run finds nothing to do and leaves the file as it is (without loading the model).
    before = out.read_text()
    assert main([*args[:-len(CPU)], "--device", "no-such-device"]) == 0
    assert out.read_text() == before


def test_says_how_to_get_the_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "kvik_server.cli", None)  # as if kvik-server were not installed
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hi")])
    assert main(["run-batch", "-i", str(source), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "pip install 'kvik[server]'" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err
    source = write_lines(tmp_path / "in.jsonl", [chat("a", "hi")])
    assert main(["run-batch", "-i", str(source), "-o", str(tmp_path / "no" / "out.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(source), "-o", str(source)]) == 2
    assert "must not be the --input" in capsys.readouterr().err


def test_server_side_failures_get_no_record_and_are_retried(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvik_server.direct

    model = str(tiny_model_dir("llama", max_position_embeddings=512))
    source = write_lines(tmp_path / "in.jsonl", [
        chat("c", "hi", max_tokens=2),
        {"custom_id": "p", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 2}},
    ])  # fmt: skip
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", str(source), "-o", str(out), "--model", model, "--max-model-len", "512", *CPU]

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the handler")

    with monkeypatch.context() as patch:
        patch.setattr(kvik_server.direct, "create_completion", broken)
        assert main(args) == 1
    assert "1 request(s) failed on the server's side" in capsys.readouterr().err
    assert set(read_records(out)) == {"c"}
    assert main([*args, "--progress"]) == 0  # the retry runs only what has no record yet
    err = capsys.readouterr().err
    assert "run-batch: 100%" in err and "1/1" in err  # the progress bar counted the one request left
    records = read_records(out)
    assert set(records) == {"c", "p"} and records["p"][0]["response"]["status_code"] == 200


def test_heap_is_frozen_only_while_requests_run(tiny_model_dir: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The engine's and app's heap is out of the collector's sight while lines run (full collections over
    it stalled the engine), and back in it afterwards."""
    from kvik.entrypoints import batch

    model = str(tiny_model_dir("llama", max_position_embeddings=512))
    source = write_lines(tmp_path / "in.jsonl", [chat(f"c{i}", "hi", max_tokens=2) for i in range(3)])
    seen: list[int] = []
    inner = batch.post

    async def post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        seen.append(gc.get_freeze_count())
        return await inner(app, path, body)

    monkeypatch.setattr(batch, "post", post)
    assert gc.get_freeze_count() == 0
    args = ["run-batch", "-i", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", model, *CPU]
    assert main(args) == 0
    assert len(seen) == 3 and min(seen) > 10_000  # the modules, the engine and the app: a large heap
    assert gc.get_freeze_count() == 0
    assert set(read_records(tmp_path / "out.jsonl")) == {"c0", "c1", "c2"}


def _same_as_server(records: dict[str | None, list[dict[str, Any]]], lines: list[dict[str, Any]], model: Path) -> None:
    """Each line's record holds the body an in-process `kvik serve` returns for it (ids and times aside)."""
    server = InProcessServer(model, dtype="float32", max_model_len=128)
    try:
        for line in lines:
            (record,) = records[line["custom_id"]]
            expected = server.post(line["url"], line["body"])
            response = record["response"]
            assert record["error"] is None and response["status_code"] == expected.status_code, line["custom_id"]
            got, want = response["body"], expected.json()
            if expected.status_code == 200:
                assert response["request_id"] == got["id"]
                for volatile in ("id", "created"):
                    assert (got.pop(volatile, None) is None) == (want.pop(volatile, None) is None)
            _assert_close(got, want, line["custom_id"])
    finally:
        server.close()


def _assert_close(got: Any, want: Any, where: str) -> None:
    """Equal bodies, floats within 1e-6 and base64 embeddings decoded (a batch's padding may move
    float32 values by an ulp)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            pair = (_decoded(got[key]), _decoded(want[key])) if key == "embedding" else (got[key], want[key])
            _assert_close(*pair, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), where
    else:
        assert got == want, where


def _decoded(value: Any) -> Any:
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(value), dtype="<f4").tolist() if isinstance(value, str) else value


def test_pooling_lines_equal_the_servers(tmp_path: Path) -> None:
    """Embedding lines on an embedder, rerank / score / classify lines on a cross-encoder: the server's answers."""
    from kvik.testing.tiny_encoders import make_tiny_cross_encoder, make_tiny_encoder

    def post(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}}

    embedder = make_tiny_encoder(tmp_path / "embedder", "bert", "mean")
    lines = [
        post("one", "/v1/embeddings", input="hello world"),
        post("many", "/v1/embeddings", input=["tell me a story", "a", "the lazy dog"], dimensions=16),
        post("ids", "/v1/embeddings", input=[[2, 40, 41, 3]], encoding_format="base64"),
        post("empty", "/v1/embeddings", input=[]),
        post("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}]),
    ]
    out = tmp_path / "embeddings.jsonl"
    args = ["run-batch", "-i", str(write_lines(tmp_path / "embeddings_in.jsonl", lines)), "-o", str(out),
            "--model", str(embedder), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "128",
            *CPU]  # fmt: skip
    assert main(args) == 0
    records = read_records(out)
    assert len(records["many"][0]["response"]["body"]["data"][2]["embedding"]) == 16
    _same_as_server(records, lines, embedder)

    reranker = make_tiny_cross_encoder(tmp_path / "reranker", "bert")
    docs = ["a story about a cat", "def main(): pass", "hello"]
    lines = [
        post("rerank", "/v1/rerank", query="tell me a story", documents=docs, top_n=2),
        post("score", "/score", text_1="tell me a story", text_2=docs),
        post("classify", "/classify", input=["hello", "world"]),
        post("embed", "/v1/embeddings", input="x"),
    ]
    out = tmp_path / "rerank.jsonl"
    args[2:3], args[4:5], args[6:7] = [str(write_lines(tmp_path / "rerank_in.jsonl", lines))], [str(out)], [str(reranker)]
    assert main(args) == 0
    _same_as_server(read_records(out), lines, reranker)


def test_direct_answers_are_the_apps(tiny_model_dir: Any) -> None:
    """kvik_server.direct runs a line through the app's own steps without its ASGI stack: the same answer as
    a POST to the app, refusals included; its routes are the urls a line may name, each a POST route of the app."""
    from kvik.entrypoints.batch_file import SUPPORTED_URLS
    from kvik_server import direct

    assert set(direct.ROUTES) == set(SUPPORTED_URLS)
    server = InProcessServer(tiny_model_dir("llama", max_position_embeddings=256), dtype="float32")
    try:
        posts = {route.path for route in server.app.routes if "POST" in getattr(route, "methods", ())}
        assert set(direct.ROUTES) <= posts
        deep: dict[str, Any] = {}
        for _ in range(120):
            deep = {"a": deep}
        hi = [{"role": "user", "content": "hi"}]
        cases = [
            ("/v1/chat/completions", {"messages": hi, "max_tokens": 3, "temperature": 0}),
            ("/v1/completions", {"prompt": ["a b", "c d"], "max_tokens": 2, "temperature": 0, "echo": True}),
            ("/v1/chat/completions", {"messages": hi, "max_token": 3}),  # unknown field
            ("/v1/chat/completions", {"max_tokens": 3}),  # missing field
            ("/v1/completions", {"prompt": {"a": 1}}),  # wrong type
            ("/v1/completions", {"prompt": "x", "max_tokens": -1}),  # bad value
            ("/v1/completions", {"prompt": "x", "model": "other"}),
            ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}),  # over max_model_len
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "lone \ud800"}]}),
            ("/v1/chat/completions", {"messages": hi, "metadata": deep}),
            ("/v1/embeddings", {"input": "hi"}),  # a pooling request to a generation model
        ]
        for path, body in cases:
            want = server.post(path, body)
            status, got = server.run(direct.post(server.app, path, body))
            assert status == want.status_code, (path, body)
            expected = want.json()
            if status == 200:
                for volatile in ("id", "created"):
                    assert got.pop(volatile) and expected.pop(volatile)
            assert got == expected, (path, body)
    finally:
        server.close()
