"""OpenAI Batch files: parsing lines, error records, and what a resumed run skips (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.entrypoints.batch_file import (
    BatchRequest,
    Done,
    LineError,
    parse_line,
    plan,
    read_done,
    response_record,
    resume_keys,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def line(custom_id: object = "a", url: object = "/v1/chat/completions", body: object = CHAT, **extra: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def test_parse_good_lines() -> None:
    item = parse_line(3, line())
    assert item == BatchRequest(3, "a", "/v1/chat/completions", CHAT)
    no_method = json.dumps({"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "x"}})
    assert isinstance(parse_line(1, no_method), BatchRequest)
    assert parse_line(1, "   ") is None


def test_parse_bad_lines_name_the_problem() -> None:
    cases = {
        "{not json": ("invalid_json_line", None),
        "[1, 2]": ("invalid_request", None),
        line(custom_id=""): ("missing_custom_id", None),
        line(custom_id=7): ("missing_custom_id", None),
        line(url="/v1/images"): ("invalid_url", "a"),
        line(body=[1]): ("invalid_request", "a"),
        line(body={**CHAT, "stream": True}): ("invalid_request", "a"),
        line(method="GET"): ("invalid_method", "a"),
        line(extra_field=1): ("invalid_request", "a"),
    }
    for text, (code, custom_id) in cases.items():
        item = parse_line(5, text)
        assert isinstance(item, LineError), text
        assert (item.code, item.custom_id, item.line) == (code, custom_id, 5), text
        record = item.record()
        assert record["response"] is None and record["error"]["line"] == 5 and record["custom_id"] == custom_id
        assert record["id"].startswith("batch_req_")
    not_utf8 = parse_line(2, b'{"custom_id": "\xff"}')
    assert isinstance(not_utf8, LineError) and not_utf8.code == "invalid_utf8"
    raw = json.dumps({"custom_id": "u", "url": "/v1/completions", "body": {"prompt": "a\u2028b"}}, ensure_ascii=False)
    assert "\u2028" in raw and len(raw.encode().splitlines()) == 1  # why run-batch splits bytes, not str
    assert isinstance(parse_line(2, raw.encode()), BatchRequest)
    for url in ("/v1/embeddings", "/v1/rerank", "/score", "/classify"):  # pooling lines run too
        assert parse_line(1, line(url=url, body={"input": "x"})) == BatchRequest(1, "a", url, {"input": "x"})


def test_response_record_takes_the_request_id_from_the_body() -> None:
    record = response_record("a", 200, {"id": "chatcmpl-1", "choices": []})
    assert record["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": {"id": "chatcmpl-1",
                                                                                            "choices": []}}  # fmt: skip
    assert record["error"] is None and record["custom_id"] == "a"
    error = response_record("b", 400, {"error": {"message": "bad"}})
    assert error["response"]["status_code"] == 400 and error["response"]["request_id"].startswith("req_")


def test_duplicates_and_done_ids_are_skipped() -> None:
    lines = [line("a"), line("b"), line("a"), "", "junk", line("c")]
    requests, errors = plan(lines, Done(set(), set(), 0))
    assert [r.custom_id for r in requests] == ["a", "b", "c"]
    assert [(e.line, e.code) for e in errors] == [(3, "duplicate_custom_id"), (5, "invalid_json_line")]
    requests, errors = plan(lines, Done({"a", "c"}, {5}, 3))
    assert [r.custom_id for r in requests] == ["b"]
    assert [(e.line, e.code) for e in errors] == [(3, "duplicate_custom_id")]


def test_read_done_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert read_done(out).records == 0
    records = [response_record("a", 200, {"id": "x"}), LineError(4, "invalid_json_line", "bad").record(),
               LineError(6, "duplicate_custom_id", "dup", "a").record(), LineError(7, "invalid_url", "e", "e").record()]  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in records)
    out.write_text(text + '{"id": "batch_req_torn", "custom_id": "b", "resp')
    done = read_done(out)
    assert done.custom_ids == {"a", "e"} and done.lines == {4, 6} and done.records == 4
    assert out.read_text() == text


# A line of a random batch file: valid with one of a few ids, an error line, blank, or junk.
lines_strategy = st.lists(
    st.one_of(
        st.sampled_from("abcde").map(lambda c: line(c)),
        st.sampled_from("abcde").map(lambda c: line(c, url="/v1/images")),
        st.just(""),
        st.text(max_size=8),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(lines=lines_strategy, split=st.integers(0, 12))
def test_every_line_gets_one_record_across_interrupted_runs(lines: list[str], split: int) -> None:
    """Run part of the file, resume on the whole: each non-blank line ends with exactly one record."""
    first_requests, first_errors = plan(lines[:split], Done(set(), set(), 0))
    written = [response_record(r.custom_id, 200, {}) for r in first_requests] + [e.record() for e in first_errors]
    done = Done(set(), set(), len(written))
    for record in json.loads(json.dumps(written)):
        custom_id, number = resume_keys(record)
        assert (custom_id is None) != (number is None)
        done.custom_ids.update([custom_id] if custom_id else [])
        done.lines.update([number] if number else [])
    requests, errors = plan(lines, done)
    everything = plan(lines, Done(set(), set(), 0))
    assert len(first_requests) + len(requests) == len(everything[0])
    assert len(first_errors) + len(errors) == len(everything[1])
    assert len(everything[0]) + len(everything[1]) == sum(1 for t in lines if t.strip())
    ids = [r.custom_id for r in first_requests + requests]
    assert len(ids) == len(set(ids))
