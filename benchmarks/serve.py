"""Online serving benchmark: streaming requests against any OpenAI-compatible server on loopback.

Start a server first (``kvik serve --model M`` or llama-cpp-python's ``python -m llama_cpp.server``), then::

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --endpoint chat \\
        --num-prompts 200 --request-rate 1,4,16,inf --max-concurrency 32 --input-len 128 --output-len 64

Arrivals are Poisson at each ``--request-rate`` (requests/s; ``inf`` sends all at once) and
``--max-concurrency`` caps in-flight requests, so ``--request-rate inf --max-concurrency C`` is
a fixed-concurrency run. Every run is bounded by ``--num-prompts`` and ``--max-duration``.
Reported, as in ``vllm bench serve``: request throughput, output tokens/s, TTFT, TPOT =
(e2e - ttft) / (output tokens - 1) per request with > 1 token, ITL = every gap between streamed
chunks, pooled, and e2e latency (mean / p50 / p90 / p99, milliseconds).
Output tokens come from the server's ``usage`` (stream_options.include_usage) when it sends one,
else from the number of streamed content chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

_WORD_TEXT = ("the of and to in is was for on that with as by at from his an were are which this be or has had one "
         "not but all their time new first they after two who been its more year people state world city some "
         "would other into there most last over also used many when school may where only game such high part "
         "story model cache block token batch request server engine memory river light house water music")  # fmt: skip
WORDS = _WORD_TEXT.split()
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from send to the first content chunk
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # seconds between consecutive content chunks


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # a distinct leading number per prompt defeats prefix caching across requests
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(max(1, input_len - 1))) for i in range(n)]


def build_body(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "stream": True,
                            "temperature": args.temperature}  # fmt: skip
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.usage:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True  # vLLM/kvik extension; other servers may refuse or ignore it
    return body


async def send(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = str(payload["error"])[:200]
                    return result
                if payload.get("usage"):
                    result.output_tokens = int(payload["usage"].get("completion_tokens", 0))
                    result.prompt_tokens = int(payload["usage"].get("prompt_tokens", 0))
                for choice in payload.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "no content streamed"
    return result


async def run_rate(
    args: argparse.Namespace, model: str, rate: float, warm: list[str], prompts: list[str]
) -> dict[str, Any]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=100)
    gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        for prompt in warm:  # not measured: first-request costs (allocation, compilation) stay out
            await send(client, path, build_body(args, model, prompt))

        async def one(prompt: str) -> RequestResult:
            async with gate:
                return await send(client, path, build_body(args, model, prompt))

        tasks: list[asyncio.Task[RequestResult]] = []
        start = time.perf_counter()
        for prompt in prompts:
            if time.perf_counter() - start > args.max_duration:
                break
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        remaining = max(1.0, args.max_duration + args.drain_timeout - (time.perf_counter() - start))
        done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        duration = time.perf_counter() - start
    results = [t.result() for t in tasks if t in done]
    return summarize(rate, results, len(pending), duration)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered) * 1e3, "p50": pct(50) * 1e3, "p90": pct(90) * 1e3, "p99": pct(99) * 1e3}


def summarize(rate: float, results: list[RequestResult], cancelled: int, duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})[:3]
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(ok),
        "failed": len(results) - len(ok) + cancelled,
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (output + prompt) / duration,
        "total_output_tokens": output,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
        "errors": errors,
    }


def print_table(rows: list[dict[str, Any]], file: Any = sys.stdout) -> None:
    header = (f"{'rate':>6} {'ok':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>9} | {'TTFT p50':>8} {'p90':>7} {'p99':>7} | "
              f"{'TPOT p50':>8} {'p90':>7} {'p99':>7} | {'ITL p50':>7} {'p90':>7} {'p99':>7}  (ms)")  # fmt: skip
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
        print(f"{r['request_rate']!s:>6} {r['completed']:>5} {r['failed']:>4} {r['request_throughput']:>7.2f} "
              f"{r['output_throughput']:>9.1f} | {t['p50']:>8.1f} {t['p90']:>7.1f} {t['p99']:>7.1f} | "
              f"{p['p50']:>8.2f} {p['p90']:>7.2f} {p['p99']:>7.2f} | {i['p50']:>7.2f} {i['p90']:>7.2f} {i['p99']:>7.2f}",
              file=file)  # fmt: skip
        for error in r["errors"]:
            print(f"       error: {error}", file=file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is fine)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("KVIK_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--request-rate", default="inf", help="comma-separated requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (kvik/vLLM) for fixed output lengths")
    p.add_argument("--no-usage", dest="usage", action="store_false", help="don't send stream_options.include_usage")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-duration", type=float, default=300.0, help="stop sending new requests after this (s)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="then wait this long for in-flight ones (s)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request HTTP timeout (s)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before each rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="write the results (one record per rate) to this JSON file")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    host = urlparse(args.base_url).hostname or ""
    if host not in LOOPBACK and host.strip("[]") not in LOOPBACK:
        p.error(f"--base-url host {host!r} is not loopback; this benchmark only targets local servers")
    args.rates = [float(r) for r in args.request_rate.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    if model is None:
        listing = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).raise_for_status().json()
        model = listing["data"][0]["id"]
    prompts = make_prompts(args.num_prompts + args.warmup, args.input_len, args.seed)
    warm, measured = prompts[: args.warmup], prompts[args.warmup :]
    rows = []
    for rate in args.rates:
        rows.append(asyncio.run(run_rate(args, model, rate, warm, measured)))
    print(f"model {model} @ {args.base_url} ({args.endpoint}, {args.num_prompts} prompts, input ~{args.input_len} "
          f"words, max_tokens {args.output_len}, concurrency cap {args.max_concurrency or 'none'})")  # fmt: skip
    print_table(rows)
    if args.json_out:
        meta = {k: v for k, v in vars(args).items() if k != "api_key"}
        with open(args.json_out, "w") as f:
            json.dump({"config": meta, "model": model, "results": rows}, f, indent=2, default=str)
    return 0 if all(r["completed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
