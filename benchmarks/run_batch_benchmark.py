"""`kvik run-batch` vs `LLM.chat` on the same chat requests, alternating and repeated, wall and CPU time.

    python benchmarks/run_batch_benchmark.py                       # CPU: tiny model, host-bound steps
    python benchmarks/run_batch_benchmark.py --n 512 --out-len 64 --repeats 3
    python benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16   # a GPU

A random Llama (``--shape`` of benchmarks/gpu_common.py; ``tiny``: 2 layers, hidden 64, so a CPU step
takes a few ms and the host work per request is what decides) with a ChatML template serves ``--n``
chat requests (64-256 words, ``--out-len`` tokens, greedy, EOS ignored), each side on a fresh engine:

* ``chat``: ``LLM.chat`` (templating inside the timing);
* ``run_batch``: run-batch's runner (core/kvik/entrypoints/batch.py ``run_requests``: every line
  through the server's app in-process), timed from its first request to its last answer.

The two alternate ``--repeats`` times in one process (the machine may be shared: each row records wall
seconds and this process's CPU seconds, all threads). The ratio is of output tokens per wall second.
A JSON summary is printed last and written to $OUT/run_batch_benchmark.json (or /tmp).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def make_chats(n: int, vocab: int, seed: int = 7) -> list[list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": " ".join(f"w{i}" for i in rng.integers(3, vocab, size=int(k)))}]
            for k in rng.integers(64, 257, size=n)]  # fmt: skip


def write_model(shape: str, root: Path, device: str) -> Path:
    from gpu_common import SHAPES, word_tokenizer, write_random_checkpoint
    from kvik.testing.tiny_models import CHAT_TEMPLATE

    path = write_random_checkpoint(shape, root, device=device)
    tokenizer = word_tokenizer(SHAPES[shape]["vocab_size"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


STEPS = [0, 0.0, 0.0, 0.0]  # engine steps, seconds inside them, first and last step's start (perf_counter)


def count_steps() -> None:
    """Count LLMEngine.step calls (a side that admits its requests late runs more, smaller steps)."""
    from kvik.engine.llm_engine import LLMEngine

    inner = LLMEngine.step

    def step(self: Any) -> Any:
        STEPS[0] += 1
        t0 = time.perf_counter()
        STEPS[2] = STEPS[2] or t0
        STEPS[3] = t0
        try:
            return inner(self)
        finally:
            STEPS[1] += time.perf_counter() - t0

    LLMEngine.step = step  # type: ignore[method-assign]


GC = [0, 0.0, 0.0]  # full (generation-2) collections during the timed side, seconds in them; a start time


def on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        GC[2] = time.perf_counter()
    elif info["generation"] == 2:
        GC[0] += 1
        GC[1] += time.perf_counter() - GC[2]


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live Python thread, by name (Linux /proc)."""
    import threading

    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[thread.name] = out.get(thread.name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def step_times(start: float, end: float) -> dict[str, Any]:
    """Steps, seconds inside them, seconds before the first step and after the last one began; full GCs."""
    return {"full_gcs": GC[0], "full_gc_s": round(GC[1], 3), "steps": STEPS[0], "in_steps_s": round(STEPS[1], 3), "before_first_step_s": round(STEPS[2] - start, 3),
            "after_last_step_s": round(end - STEPS[3], 3)}  # fmt: skip


def time_chat(engine: dict[str, Any], chats: list[Any], out_len: int) -> dict[str, Any]:
    """``LLM.chat`` on a fresh engine: one timed call."""
    from kvik import LLM, SamplingParams

    llm = LLM(**engine)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    sync()
    STEPS[:] = [0, 0.0, 0.0, 0.0]
    GC[:] = [0, 0.0, 0.0]
    wall, cpu = time.perf_counter(), time.process_time()
    start = wall
    outs = llm.chat(chats, params, use_tqdm=False)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.shutdown()
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), **step_times(start, start + wall)}  # fmt: skip


def time_run_batch(engine: dict[str, Any], chats: list[Any], out_len: int, root: Path) -> dict[str, Any]:
    """run-batch's runner on a fresh engine, from its first request to its last answer."""
    from kvik.entrypoints import batch
    from kvik.entrypoints.batch_file import BatchRequest
    from kvik_server.context import ServerSettings

    requests = [BatchRequest(i + 1, f"r{i}", "/v1/chat/completions",
                             {"messages": c, "max_tokens": out_len, "temperature": 0, "ignore_eos": True})
                for i, c in enumerate(chats)]  # fmt: skip
    marks: list[tuple[float, float]] = []
    inner = batch.post

    threads: list[dict[str, float]] = []

    async def timed_post(app: Any, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        if not marks:
            threads.append(thread_cpu())
        marks.append((time.perf_counter(), time.process_time()))
        answer = await inner(app, url, body)
        marks.append((time.perf_counter(), time.process_time()))
        if len(marks) == 2 * len(requests):
            threads.append(thread_cpu())
        return answer

    batch.post = timed_post  # type: ignore[assignment]  # measurement only
    STEPS[:] = [0, 0.0, 0.0, 0.0]
    GC[:] = [0, 0.0, 0.0]
    out_file = root / "run_batch_out.jsonl"
    settings = ServerSettings(served_model_name=None, max_request_body_bytes=None, ui=False)
    try:
        with out_file.open("w") as out:
            failed = asyncio.run(batch.run_requests(requests, out, dict(engine), settings, False))
    finally:
        batch.post = inner  # type: ignore[assignment]
    bodies = [json.loads(line)["response"]["body"] for line in out_file.read_text().splitlines()]
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies if "usage" in b)
    wall = max(m[0] for m in marks) - min(m[0] for m in marks)
    cpu = max(m[1] for m in marks) - min(m[1] for m in marks)
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), **step_times(min(m[0] for m in marks), max(m[0] for m in marks)),
            "failed": len(failed), "thread_cpu_s": {name: round(t - threads[0].get(name, 0.0), 3)
                                                   for name, t in threads[-1].items()}}  # fmt: skip


def compare(engine: dict[str, Any], chats: list[Any], out_len: int, repeats: int, root: Path) -> dict[str, Any]:
    """Alternate the two sides ``repeats`` times; the median ratio of their throughputs."""
    rows: list[dict[str, Any]] = []
    if ARGS.warmup:  # both sides once, not recorded: the process's first engines are slower (kernel set-up)
        time_chat(engine, chats, out_len)
        time_run_batch(engine, chats, out_len, root)
    for i in range(repeats):
        order = ("chat", "run_batch") if i % 2 == 0 else ("run_batch", "chat")
        row: dict[str, Any] = {}
        for side in order:
            if ARGS.only and side != ARGS.only:
                continue
            gc.collect()  # each side starts with the collector in the same state (not timed)
            row[side] = time_chat(engine, chats, out_len) if side == "chat" else time_run_batch(
                engine, chats, out_len, root)  # fmt: skip
        if ARGS.only:
            print(f"repeat {i}: {json.dumps(row)}", flush=True)
            continue
        row["ratio"] = round(row["run_batch"]["tokens_per_s"] / row["chat"]["tokens_per_s"], 3)
        row["cpu_ratio"] = round(row["run_batch"]["cpu_seconds"] / row["chat"]["cpu_seconds"], 3)
        print(f"repeat {i}: {json.dumps(row)}", flush=True)
        rows.append(row)
    if not rows:
        return {}
    return {"rows": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rows),
            "within_5_percent": abs(statistics.median(r["ratio"] for r in rows) - 1) <= 0.05}  # fmt: skip


def main() -> int:
    import torch
    from gpu_common import SHAPES

    count_steps()
    gc.callbacks.append(on_gc)
    root = Path(tempfile.mkdtemp(prefix="kvik-run-batch-bench-"))
    path = write_model(ARGS.shape, root, ARGS.device)
    engine: dict[str, Any] = dict(model=str(path), dtype=ARGS.dtype, max_model_len=2048, max_num_seqs=ARGS.max_num_seqs,
                                  device=ARGS.device)  # fmt: skip
    if ARGS.device == "cpu":
        engine["num_threads"] = ARGS.num_threads
    chats = make_chats(ARGS.n, SHAPES[ARGS.shape]["vocab_size"])
    summary: dict[str, Any] = {
        "script": "benchmarks/run_batch_benchmark.py", "shape": ARGS.shape, "device": ARGS.device,
        "torch": torch.__version__, "requests": ARGS.n, "max_tokens": ARGS.out_len, "engine": engine,
        "cpus": os.cpu_count(), "load_before": os.getloadavg(),
    }  # fmt: skip
    summary.update(compare(engine, chats, ARGS.out_len, ARGS.repeats, root))
    summary["load_after"] = os.getloadavg()
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    out = Path(os.environ.get("OUT") or "/tmp") / "run_batch_benchmark.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", help="a shape of benchmarks/gpu_common.py (default tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=512, help="chat requests")
    p.add_argument("--out-len", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=1, help="CPU: torch intra-op threads")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run both sides once first, unrecorded")  # fmt: skip
    p.add_argument("--only", choices=["chat", "run_batch"], help="time one side only (for profiling)")
    p.add_argument("--repeats", type=int, default=3, help="alternating (chat, run-batch) pairs")
    return p.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(main())
