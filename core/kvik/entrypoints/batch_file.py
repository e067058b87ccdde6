"""OpenAI's Batch file format: input lines in, result records out, and what a resumed run skips.

Input, one JSON object a line::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

(``url``: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, or kvik serve's pooling
routes ``/v1/rerank``, ``/score``, ``/classify`` and their aliases.)

Output, one record a line (in completion order, as OpenAI's)::

    {"id": "batch_req_…", "custom_id": "req-1", "response": {"status_code": 200, "request_id": "…", "body": {...}},
     "error": null}

A request the server refuses (400, 404 ...) is a ``response`` with that status and the server's
error body, as OpenAI writes it. A line that cannot be run at all (not JSON, no ``custom_id``, an
unknown ``url``, a repeated ``custom_id``) is a record with ``response: null`` and
``error: {"code", "message", "line"}`` (``line``, 1-based, is kvik's addition).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The routes a line may name: OpenAI's generation and embedding urls, and kvik serve's pooling routes (vLLM's
# names). One engine answers a file: a generation model refuses pooling lines and a pooling model generation
# lines, each with the 400 `kvik serve` gives (see --runner).
GENERATION_URLS = ("/v1/chat/completions", "/v1/completions")
POOLING_URLS = ("/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score", "/classify", "/v1/classify")
SUPPORTED_URLS = GENERATION_URLS + POOLING_URLS


@dataclass(slots=True)
class BatchRequest:
    """One runnable input line."""

    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(slots=True)
class LineError:
    """An input line that cannot be run; ``custom_id`` when the line had a usable one."""

    line: int
    code: str
    message: str
    custom_id: str | None = None

    def record(self) -> dict[str, Any]:
        error = {"code": self.code, "message": self.message, "line": self.line}
        return {"id": new_record_id(), "custom_id": self.custom_id, "response": None, "error": error}


def new_record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_record(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    """The record for a request the server answered (any status)."""
    request_id = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    response = {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}", "body": body}
    return {"id": new_record_id(), "custom_id": custom_id, "response": response, "error": None}


def parse_line(line: int, raw: str | bytes) -> BatchRequest | LineError | None:
    """One input line as a request, or the reason it cannot run; None for a blank line."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        return LineError(line, "invalid_utf8", f"line {line} is not valid UTF-8: {exc}")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(line, "invalid_json_line", f"line {line} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return LineError(line, "invalid_request", f"line {line} must be a JSON object, got {type(data).__name__}")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(line, "missing_custom_id", f"line {line} needs a non-empty string 'custom_id'")

    def fail(code: str, message: str) -> LineError:
        return LineError(line, code, message, custom_id)

    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        return fail("invalid_request", f"unknown field(s) {unknown}; a line has custom_id, method, url and body")
    if data.get("method", "POST") != "POST":
        return fail("invalid_method", f"method must be 'POST', got {data.get('method')!r}")
    url = data.get("url")
    if url not in SUPPORTED_URLS:
        return fail("invalid_url", f"url must be one of {', '.join(SUPPORTED_URLS)}, got {url!r}")
    body = data.get("body")
    if not isinstance(body, dict):
        return fail("invalid_request", "'body' must be a JSON object (the request body for the url)")
    if body.get("stream"):
        return fail("invalid_request", "'stream' is not supported in a batch; drop it (results are written whole)")
    return BatchRequest(line, custom_id, url, body)


@dataclass(slots=True)
class Done:
    """What an earlier run already wrote to the output file."""

    custom_ids: set[str]
    lines: set[int]  # lines recorded by number (no custom_id, or a repeated one)
    records: int


def resume_keys(record: Any) -> tuple[str | None, int | None]:
    """(custom_id, line) under which a record counts as done; a repeated custom_id counts by line only."""
    if not isinstance(record, dict):
        return None, None
    error = record.get("error")
    line = error.get("line") if isinstance(error, dict) else None
    custom_id = record.get("custom_id")
    if isinstance(error, dict) and (custom_id is None or error.get("code") == "duplicate_custom_id"):
        return None, line if isinstance(line, int) else None
    return (custom_id if isinstance(custom_id, str) else None), None


def read_done(path: Path) -> Done:
    """The records already in ``path``; a torn last line (an interrupted write) is cut off the file."""
    done = Done(set(), set(), 0)
    if not path.exists():
        return done
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:  # drop the partial record so appending starts on a fresh line
            f.truncate(len(complete))
    for raw in complete.splitlines():
        try:
            custom_id, line = resume_keys(json.loads(raw))
        except json.JSONDecodeError:
            continue
        if custom_id is not None:
            done.custom_ids.add(custom_id)
        if line is not None:
            done.lines.add(line)
        done.records += 1
    return done


def plan(lines: Sequence[str | bytes], done: Done) -> tuple[list[BatchRequest], list[LineError]]:
    """The requests still to run and the line errors still to write, in file order."""
    requests: list[BatchRequest] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if number in done.lines:
            continue
        item = parse_line(number, text)
        if item is None:
            continue
        custom_id = item.custom_id
        if custom_id is not None and custom_id in seen:
            errors.append(LineError(number, "duplicate_custom_id",
                                    f"custom_id {custom_id!r} already appeared earlier in the file", custom_id))  # fmt: skip
            continue
        if custom_id is not None:
            seen.add(custom_id)
            if custom_id in done.custom_ids:
                continue
        if isinstance(item, LineError):
            errors.append(item)
        else:
            requests.append(item)
    return requests, errors
