"""Shared helpers for benchmark scripts: model shapes, workloads, stats, tables."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# Random-weight model shapes (weights are generated, never downloaded).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def build_model(shape: str, root: Path, dtype: str = "float32") -> Path:
    """A random-weight Llama of ``shape`` under ``root`` (reused if already there)."""
    from kvik.testing.tiny_models import make_tiny_model

    path = root / f"{shape}-{dtype}"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch="llama", dtype=dtype, max_position_embeddings=4096, **SHAPES[shape])
    return path


def workload(
    num_requests: int, input_len: tuple[int, int], vocab: int, seed: int = 0, shared_prefix: int = 0
) -> list[list[int]]:
    """Random-token prompts with lengths uniform in ``input_len`` (inclusive), optionally sharing a prefix."""
    import random

    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*input_len))] for _ in range(num_requests)]


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB.

    Linux's ``VmHWM`` belongs to the address space, which ``execve`` replaces; ``ru_maxrss`` survives
    ``execve`` and so starts a child of ``run_isolated`` at its parent's size when forked (a parent that had
    just exported an ONNX model made every later system read 818 MiB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps}
    ordered = sorted(values)
    out = {}
    for p in ps:
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        out[f"p{p}"] = ordered[k]
    out["mean"] = statistics.fmean(ordered)
    return out


def run_isolated(argv: list[str]) -> dict[str, Any]:
    """Run ``python argv`` in a fresh process (own peak RSS); parse the JSON it prints last."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
