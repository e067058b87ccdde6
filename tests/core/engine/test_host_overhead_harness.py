"""benchmarks/host_overhead.py runs the real engine loop (CUDA runner on the CPU, stand-in forward) and
reports every phase: a small run in a subprocess (it registers its own platform in the process-wide
plugin manager, which the other tests must not see)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_harness_reports_each_phase_of_decode_steps(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "host_overhead.py"), "--running", "3,8", "--steps", "6"]
    cmd += ["--warmup", "2", "--prompt-len", "20", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["running"] for r in results] == [3, 8]
    for r in results:
        ms = r["ms_per_step"]
        assert set(ms) == {"schedule", "prepare", "model", "sample", "outputs", "other", "total"}
        assert all(ms[p] > 0 for p in ("schedule", "prepare", "sample", "outputs", "total"))
        parts = sum(v for k, v in ms.items() if k != "total")
        assert abs(parts - ms["total"]) < 1e-6
    assert "running=   8" in proc.stdout
