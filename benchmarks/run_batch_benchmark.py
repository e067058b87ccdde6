"""`kvik run-batch` vs `LLM.chat` on the same chat requests, alternating and repeated, wall and CPU time.

    python benchmarks/run_batch_benchmark.py                       # CPU: tiny model, host-bound steps
    python benchmarks/run_batch_benchmark.py --n 512 --out-len 64 --repeats 5
    python benchmarks/run_batch_benchmark.py --sides chat,run_batch,run_batch_nofreeze   # the GC freeze's effect
    python benchmarks/run_batch_benchmark.py --shape smollm2 --device cuda --dtype bfloat16   # a GPU

A random Llama (``--shape`` of benchmarks/gpu_common.py; ``tiny``: 2 layers, hidden 64, so a CPU step
takes ~10 ms at 256 sequences and the host work per request decides) with a ChatML template serves
``--n`` chat requests (64-256 words, ``--out-len`` tokens, greedy, EOS ignored), each side on a fresh engine:

* ``chat``: ``LLM.chat`` (templating inside the timing);
* ``chat_new_process``: the same in a new process (spawned for the side and gone after it), so that it starts
  as cold as run-batch's engine process does: this process's warm-up does not help either;
* ``run_batch``: run-batch's runner (core/kvik/entrypoints/batch.py ``run_requests``: every line
  through the server's app in-process, the engine stepping in a child process), timed from its first
  request to its last answer;
* ``run_batch_in_process``: the same with the engine in this process, on a thread (how run-batch ran
  before the engine got a process of its own);
* ``run_batch_nofreeze``: ``run_batch`` with ``gc.freeze`` made a no-op (how run-batch ran before it froze the heap).

The sides alternate ``--repeats`` times in one process after one unrecorded warm-up of each (the
machine may be shared: each row has wall seconds and this process's CPU seconds, all threads, and
per-thread CPU for run-batch). Also per row: engine steps, seconds inside them, seconds before the
first one, and full (generation-2) garbage collections; where the engine runs in a child process, the
child counts its steps and hands them over in a file when it exits (its CPU is not in this process's). The ratio is of output tokens per wall second.
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
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

SIDES = ("chat", "chat_new_process", "run_batch", "run_batch_in_process", "run_batch_nofreeze")
# Child processes (an engine's, a side's) import this file as __mp_main__; this variable tells them
# --device-ms and the folder where an engine's child leaves its step counters.
CHILD_ENV = "KVIK_RUN_BATCH_BENCH_CHILD"
# Engine steps, seconds inside them, first and last step's start (perf_counter), seconds of --device-ms
# sleeps' overrun (waiting to get the GIL back).
STEPS = [0, 0.0, 0.0, 0.0, 0.0]
GC = [0, 0.0, 0.0]  # full collections in the timed side, seconds in them, the running one's start
_INSTRUMENTED: list[float] = []


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


def instrument(device_ms: float = 0.0) -> None:
    """Count and time LLMEngine.step, time full collections; with ``device_ms``, every forward also sleeps
    that long with the GIL released (a GPU step as the host sees it: the engine thread waits on the device
    while other threads may run). Measurement only; once per process."""
    from kvik.engine.llm_engine import LLMEngine
    from kvik.worker.torch_runner import TorchModelRunner

    if _INSTRUMENTED:
        return
    _INSTRUMENTED.append(device_ms)
    step_inner, forward_inner = LLMEngine.step, TorchModelRunner.run_model

    def step(self: Any) -> Any:
        STEPS[0] += 1
        t0 = time.perf_counter()
        STEPS[2] = STEPS[2] or t0
        STEPS[3] = t0
        try:
            return step_inner(self)
        finally:
            STEPS[1] += time.perf_counter() - t0

    def run_model(self: Any, inputs: Any) -> Any:
        out = forward_inner(self, inputs)
        t0 = time.perf_counter()
        time.sleep(device_ms / 1000)
        # Past the sleep: the OS's wake-up latency, plus waiting for the GIL when another thread holds it.
        STEPS[4] += time.perf_counter() - t0 - device_ms / 1000
        return out

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            GC[2] = time.perf_counter()
        elif info["generation"] == 2:
            GC[0] += 1
            GC[1] += time.perf_counter() - GC[2]

    LLMEngine.step = step  # type: ignore[method-assign]
    if device_ms:
        TorchModelRunner.run_model = run_model  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)


def _reset() -> None:
    STEPS[:] = [0, 0.0, 0.0, 0.0, 0.0]
    GC[:] = [0, 0.0, 0.0]


def _dump_steps(folder: str) -> None:
    """In an engine's child process, at its exit: its step counters, for the side that started it."""
    Path(folder, f"steps-{os.getpid()}.json").write_text(json.dumps(STEPS))


def _child_steps(folder: Path) -> None:
    """Take the step counters the engine's child left in ``folder`` (perf_counter is system-wide here)."""
    for path in folder.glob("steps-*.json"):
        got = json.loads(path.read_text())
        path.unlink()
        if got[0]:
            STEPS[:] = got


def _counters(start: float, end: float) -> dict[str, Any]:
    if not STEPS[0]:
        return {"full_gcs": GC[0], "full_gc_s": round(GC[1], 3)}
    return {"steps": STEPS[0], "in_steps_s": round(STEPS[1], 3), "before_first_step_s": round(STEPS[2] - start, 3),
            "after_last_step_s": round(end - STEPS[3], 3), "full_gcs": GC[0], "full_gc_s": round(GC[1], 3),
            **({"device_wait_over_s": round(STEPS[4], 3)} if _INSTRUMENTED and _INSTRUMENTED[0] else {})}  # fmt: skip


def thread_cpu() -> dict[str, tuple[float, int]]:
    """(CPU seconds, context switches) of each live Python thread, by name (Linux /proc; {} elsewhere).
    Switches count GIL hand-offs too: a thread that waits for the GIL sleeps and is woken."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, tuple[float, int]] = {}
    for thread in threading.enumerate():
        task = Path(f"/proc/self/task/{thread.native_id}")
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text().splitlines()
        except OSError:
            continue
        switches = sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
        cpu, before = (int(fields[11]) + int(fields[12])) / ticks, out.get(thread.name, (0.0, 0))
        out[thread.name] = (before[0] + cpu, before[1] + switches)
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_chat(engine: dict[str, Any], chats: list[Any], out_len: int) -> dict[str, Any]:
    """``LLM.chat`` on a fresh engine: one timed call."""
    from kvik import LLM, SamplingParams

    llm = LLM(**engine)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    sync()
    _reset()
    before = thread_cpu()
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.chat(chats, params, use_tqdm=False)
    sync()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    after = thread_cpu()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.shutdown()
    return {"seconds": round(end - start, 3), "cpu_seconds": round(cpu, 3), "output_tokens": tokens,
            "tokens_per_s": round(tokens / (end - start), 1), **_counters(start, end),
            "thread_switches": {name: t[1] - before.get(name, (0.0, 0))[1] for name, t in after.items()}}  # fmt: skip


def time_run_batch(engine: dict[str, Any], chats: list[Any], out_len: int, root: Path, freeze: bool = True,
                   engine_process: bool = True) -> dict[str, Any]:  # fmt: skip
    """run-batch's runner on a fresh engine, from its first request to its last answer."""
    from kvik.entrypoints import batch, frozen_heap
    from kvik.entrypoints.batch_file import BatchRequest
    from kvik_server.context import ServerSettings

    requests = [BatchRequest(i + 1, f"r{i}", "/v1/chat/completions",
                             {"messages": c, "max_tokens": out_len, "temperature": 0, "ignore_eos": True})
                for i, c in enumerate(chats)]  # fmt: skip
    marks: list[tuple[float, float]] = []
    threads: list[dict[str, float]] = []
    inner = batch.post

    async def timed_post(app: Any, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        if not marks:
            threads.append(thread_cpu())
        marks.append((time.perf_counter(), time.process_time()))
        answer = await inner(app, url, body)
        marks.append((time.perf_counter(), time.process_time()))
        if len(marks) == 2 * len(requests):
            threads.append(thread_cpu())
        return answer

    # Measurement only: time each request; without freeze, run-batch as it ran before it froze the heap.
    batch.post = timed_post  # type: ignore[assignment]
    if not freeze:
        frozen_heap.gc = types.SimpleNamespace(freeze=lambda: None, unfreeze=lambda: None,  # type: ignore[attr-defined]
                                               get_freeze_count=gc.get_freeze_count)  # fmt: skip
    out_file = root / "run_batch_out.jsonl"
    settings = ServerSettings(served_model_name=None, max_request_body_bytes=None, ui=False)
    _reset()
    try:
        with out_file.open("w") as out:
            failed = asyncio.run(batch.run_requests(requests, out, dict(engine), settings, False, engine_process))
    finally:
        batch.post, frozen_heap.gc = inner, gc  # type: ignore[assignment]
    if engine_process:
        _child_steps(root)
    bodies = [json.loads(line)["response"]["body"] for line in out_file.read_text().splitlines()]
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies if "usage" in b)
    start, end = min(m[0] for m in marks), max(m[0] for m in marks)
    cpu = max(m[1] for m in marks) - min(m[1] for m in marks)
    return {"seconds": round(end - start, 3), "cpu_seconds": round(cpu, 3), "output_tokens": tokens,
            "tokens_per_s": round(tokens / (end - start), 1), **_counters(start, end), "failed": len(failed),
            "thread_cpu_s": {name: round(t[0] - threads[0].get(name, (0.0, 0))[0], 3) for name, t in threads[-1].items()},
            "thread_switches": {name: t[1] - threads[0].get(name, (0.0, 0))[1] for name, t in threads[-1].items()}}  # fmt: skip


def time_side(side: str, engine: dict[str, Any], chats: list[Any], out_len: int, root: Path) -> dict[str, Any]:
    gc.collect()  # every side starts with the collector in the same state (not timed)
    if side == "chat":
        return time_chat(engine, chats, out_len)
    if side == "chat_new_process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(time_chat, engine, chats, out_len).result()
    return time_run_batch(engine, chats, out_len, root, freeze=side != "run_batch_nofreeze",
                          engine_process=side != "run_batch_in_process")  # fmt: skip


def compare(engine: dict[str, Any], chats: list[Any], out_len: int, repeats: int, root: Path,
            sides: tuple[str, ...] = ("chat", "run_batch"), warmup: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run ``sides`` ``repeats`` times, in alternating order; each run-batch side's throughput over chat's."""
    if warmup:  # each side once, not recorded: a process's first engines are slower (kernel set-up)
        for side in sides:
            time_side(side, engine, chats, out_len, root)
    rows: list[dict[str, Any]] = []
    for i in range(repeats):
        row: dict[str, Any] = {}
        for side in sides if i % 2 == 0 else sides[::-1]:
            row[side] = time_side(side, engine, chats, out_len, root)
        for side in sides:
            if side != "chat" and "chat" in row:
                row[f"{side}_ratio"] = round(row[side]["tokens_per_s"] / row["chat"]["tokens_per_s"], 3)
                row[f"{side}_cpu_ratio"] = round(row[side]["cpu_seconds"] / row["chat"]["cpu_seconds"], 3)
        print(f"repeat {i}: {json.dumps(row)}", flush=True)
        rows.append(row)
    summary: dict[str, Any] = {"rows": rows}
    for key in rows[0] if rows else ():
        if key.endswith("ratio"):
            summary[f"median_{key}"] = statistics.median(r[key] for r in rows)
    if "median_run_batch_ratio" in summary:
        summary["within_5_percent"] = abs(summary["median_run_batch_ratio"] - 1) <= 0.05
    return summary


def main() -> int:
    import torch
    from gpu_common import SHAPES

    instrument(ARGS.device_ms)
    root = Path(tempfile.mkdtemp(prefix="kvik-run-batch-bench-"))
    os.environ[CHILD_ENV] = json.dumps({"device_ms": ARGS.device_ms, "steps_dir": str(root)})
    path = write_model(ARGS.shape, root, ARGS.device)
    engine: dict[str, Any] = dict(model=str(path), dtype=ARGS.dtype, max_model_len=2048, device=ARGS.device,
                                  max_num_seqs=ARGS.max_num_seqs)  # fmt: skip
    if ARGS.device == "cpu":
        engine["num_threads"] = ARGS.num_threads
    chats = make_chats(ARGS.n, SHAPES[ARGS.shape]["vocab_size"])
    sides = tuple(ARGS.sides.split(","))
    if unknown := set(sides) - set(SIDES):
        raise SystemExit(f"unknown --sides {sorted(unknown)}; choose from {SIDES}")
    summary: dict[str, Any] = {
        "script": "benchmarks/run_batch_benchmark.py", "argv": sys.argv[1:], "shape": ARGS.shape,
        "torch": torch.__version__, "requests": ARGS.n, "max_tokens": ARGS.out_len, "engine": engine,
        "device_ms": ARGS.device_ms, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
    }  # fmt: skip
    summary.update(compare(engine, chats, ARGS.out_len, ARGS.repeats, root, sides, ARGS.warmup))
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
    p.add_argument("--sides", default="chat,run_batch,run_batch_in_process", help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all sides, alternating their order")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run every side once first, unrecorded")  # fmt: skip
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="add this many ms of GIL-free sleep to every forward (a GPU step's host view)")  # fmt: skip
    return p.parse_args()


if __name__ == "__mp_main__" and os.environ.get(CHILD_ENV):  # a child process: an engine's, or a side's
    import multiprocessing.util

    _child = json.loads(os.environ[CHILD_ENV])
    instrument(_child["device_ms"])
    if multiprocessing.current_process().name == "kvik-engine":  # run-batch's engine (engine_process.py names it)
        # A multiprocessing child runs these finalizers at exit (not atexit's).
        multiprocessing.util.Finalize(None, _dump_steps, args=(_child["steps_dir"],), exitpriority=10)

if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(main())
