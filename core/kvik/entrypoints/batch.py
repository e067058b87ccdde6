"""``kvik run-batch``: run an OpenAI Batch input file through one engine, write the Batch output file.

Every request goes through the same code as ``kvik serve`` — the server's request models,
SamplingParams conversion, chat template rendering, length checks and response bodies — by
calling the server app's handlers in-process (kvik_server/direct.py: no socket, no HTTP client, no
ASGI stack). So a line's result is exactly what ``POST url`` with that body returns from ``kvik
serve`` with the same flags, errors included, and server features (new fields, tools ...) reach
batches with no code here. That needs the server package; without it the command says how to
install it.

All pending requests are in flight at once (up to a window a few times the engine's batch), so
the engine runs full batches as ``LLM.generate`` does; it steps in a child process
(kvik/engine/engine_process.py), so the lines' handling here never holds up its steps. Results are appended as they finish and
flushed, so an interrupted run resumes where it stopped (see batch_file.py). While the lines run,
the heap that exists before them is frozen (``gc.freeze``) so that full garbage collections do not
stall the engine (docs/benchmarks.md, issue 19).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from kvik.entrypoints.batch_file import BatchRequest, plan, read_done, response_record
from kvik.entrypoints.frozen_heap import frozen_heap

SERVER_MISSING = (
    "kvik run-batch runs requests through the server's request handling, which is in the kvik-server package; "
    "install it: pip install 'kvik[server]' (or pip install -e server in a checkout)"
)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``run-batch`` adds to the engine flags."""
    parser.add_argument("-i", "--input", required=True, type=Path, help="OpenAI Batch input file (JSONL)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="results file (JSONL); custom_ids already in it are skipped (resume)")  # fmt: skip
    parser.add_argument("--served-model-name", help="the name bodies' `model` must match (default: --model)")
    parser.add_argument("--max-num-seqs", type=int, help="max sequences in the running batch")
    parser.add_argument("--max-num-batched-tokens", type=int, help="token budget per engine step")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--runner", choices=["auto", "generate", "pooling"],
                        help="generate, or pooling (embedding / rerank / score / classify lines); auto: by the "
                        "model's architecture")  # fmt: skip
    parser.add_argument("--seed", type=int, help="engine seed")
    parser.add_argument("--num-threads", type=int, help="CPU platforms: torch intra-op threads")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="render chat templates sent in bodies (chat_template); a template is code")  # fmt: skip
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip


def run_batch_command(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    """Run the file; 0 when every line has a record (refused requests are records too), 1 when some
    requests failed on the server's side (5xx: no record, so the next run retries them)."""
    try:
        from kvik_server.cli import finalize_args
    except ImportError:
        print(f"kvik: error: {SERVER_MISSING}", file=sys.stderr)
        return 2
    if not args.input.is_file():
        raise ValueError(f"--input {args.input} is not a file")
    if not args.output.parent.is_dir():
        raise ValueError(f"--output {args.output}: the folder {args.output.parent} does not exist")
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError("--output must not be the --input file")
    done = read_done(args.output)
    # Bytes: a line that is not UTF-8 is that line's error, and only \n / \r end lines (not U+2028).
    requests, errors = plan(args.input.read_bytes().splitlines(), done)
    if done.records:
        print(f"resuming: {done.records} record(s) already in {args.output}", file=sys.stderr)
    args.api_key = None
    args = finalize_args(args)  # the default model and served name, as `kvik serve` picks them
    for name in ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "seed", "num_threads", "runner"):
        if getattr(args, name) is not None:
            engine_kwargs[name] = getattr(args, name)
    engine_kwargs["model"] = args.model
    with args.output.open("a", encoding="utf-8") as out:
        for error in errors:
            write(out, error.record())
        failed: list[str] = []
        if requests:
            show = sys.stderr.isatty() if args.progress is None else args.progress
            failed = asyncio.run(run_requests(requests, out, engine_kwargs, _settings(args), show))
    print(f"{len(requests) - len(failed)} request(s) run, {len(errors)} line error(s) written to {args.output}",
          file=sys.stderr)  # fmt: skip
    if failed:
        print(f"kvik: error: {len(failed)} request(s) failed on the server's side and have no record; run the "
              f"same command again to retry them. First: {failed[0]}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _settings(args: argparse.Namespace) -> Any:
    from kvik_server.context import ServerSettings

    # A batch has no clients to protect the engine from: no key, no body limit, no back-pressure.
    return ServerSettings(
        served_model_name=args.served_model_name,
        max_request_body_bytes=None,
        trust_request_chat_template=bool(args.trust_request_chat_template),
        ui=False,
    )


def write(out: TextIO, record: dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()  # a crash loses at most the requests still running


async def run_requests(
    requests: list[BatchRequest],
    out: TextIO,
    engine_kwargs: dict[str, Any],
    settings: Any,
    progress: bool,
    engine_process: bool = True,
) -> list[str]:
    """Run ``requests``, appending their records to ``out``; returns what failed on the server's side.

    The engine steps in a process of its own (``engine_process``): the lines' handling (validation,
    templates, response bodies: ~0.5-1 ms of Python a line) then runs beside the steps instead of
    between them, which with a small model decides the run's speed (docs/benchmarks.md, issue 19)."""
    from kvik_server.app import build_app

    from kvik.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_process=engine_process, **engine_kwargs)
    app = build_app(engine, settings)
    # Enough requests in flight to keep every batch seat busy while others are being tokenized.
    window = asyncio.Semaphore(max(64, 4 * int(engine.config.max_num_seqs)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="run-batch", unit="req", file=sys.stderr)

    failed: list[str] = []  # messages of 5xx answers

    async def one(request: BatchRequest) -> None:
        async with window:
            status, body = await post(app, request.url, request.body)
        if status >= 500:
            # The server's fault (engine died, shutting down, a bug), not the request's: no record, so a
            # later run retries it.
            error = body.get("error") if isinstance(body, dict) else None
            failed.append(f"{request.custom_id}: {status} {error.get('message') if isinstance(error, dict) else body}")
        else:
            write(out, response_record(request.custom_id, status, body))
        if bar is not None:
            bar.update(1)

    # The engine, the app and every imported module are a large heap that lives to the end. The
    # requests' own objects trigger full collections, each walking all of it (0.2-0.3 s on the CPU
    # with a tiny model, holding the GIL and so the engine's steps: 512 chat lines ran 2 of them,
    # a sixth of the run); frozen, that heap is out of the collector's sight until the run ends.
    try:
        with frozen_heap():
            async with app.router.lifespan_context(app):  # starts and stops the engine loop
                await asyncio.gather(*(one(r) for r in requests))
    finally:
        if bar is not None:
            bar.close()
    return failed


async def post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST path`` with a JSON body to the server's app, in-process: (status, decoded JSON body)."""
    from kvik_server.direct import post as post_direct

    return await post_direct(app, path, body)
