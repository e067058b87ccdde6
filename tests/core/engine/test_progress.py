"""Engine start progress: step lines with times on a terminal, one summary line otherwise, log lines under INFO."""

from __future__ import annotations

import io
import logging
import re

import pytest
from kvik import LLM
from kvik.engine import progress
from kvik.engine.progress import LoadProgress


def test_steps_mode_prints_each_step_with_its_time_and_nests():
    out = io.StringIO()
    p = LoadProgress.begin(out, mode="steps")
    with progress.step("loading the model"):
        with progress.step("reading weights"):
            progress.interrupt()  # a progress bar drew here
        with progress.step("dequantizing"):
            pass
    p.finish("model 1 MiB")
    lines = out.getvalue().splitlines()
    assert lines[0] == "kvik: loading the model ... "
    assert lines[1] == "kvik:   reading weights ... "
    assert re.fullmatch(r"kvik:   reading weights: \d+\.\d s", lines[2])
    assert re.fullmatch(r"kvik:   dequantizing \.\.\. \d+\.\d s", lines[3])
    assert re.fullmatch(r"kvik: loading the model: \d+\.\d s", lines[4])
    assert re.fullmatch(r"kvik: ready in \d+\.\d s: model 1 MiB", lines[5])
    with progress.step("after finish"):  # no engine start is reported now: a no-op
        pass
    assert len(out.getvalue().splitlines()) == 6


def test_summary_mode_prints_one_line_and_off_prints_nothing(monkeypatch):
    out = io.StringIO()
    p = LoadProgress.begin(out, mode="summary")
    with progress.step("loading the model"):
        pass
    p.finish("model 2 MiB")
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("kvik: ready in ")
    monkeypatch.setenv("KVIK_PROGRESS", "0")
    quiet = io.StringIO()
    LoadProgress.begin(quiet).finish("x")
    assert quiet.getvalue() == ""


def test_log_mode_logs_start_and_end_of_each_step(caplog):
    with caplog.at_level(logging.INFO, logger="kvik"):
        p = LoadProgress.begin(io.StringIO())
        assert p.mode == "log"
        with progress.step("profiling memory"):
            pass
        p.finish("done")
    messages = [r.getMessage() for r in caplog.records if r.name == "kvik.engine.progress"]
    assert messages[0] == "profiling memory ..." and re.fullmatch(r"profiling memory: \d+\.\d s", messages[1])
    assert messages[2].startswith("ready in ")


def test_an_engine_start_reports_its_steps_and_a_summary(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("KVIK_PROGRESS", "1")  # step lines as on a terminal
    LLM(str(tiny_model_dir("llama")), device="cpu", num_kv_blocks=32, block_size=16, max_model_len=128)
    err = capsys.readouterr().err
    for name in ("reading the model's config and tokenizer", "loading the model", "reading weights",
                 "profiling memory", "allocating the KV cache"):  # fmt: skip
        assert f"{name} ..." in err or f"{name} (" in err, err
    summary = [line for line in err.splitlines() if line.startswith("kvik: ready in ")]
    assert len(summary) == 1
    assert re.search(r"model \d+ KiB, KV cache \d+ KiB float32 for 512 tokens \(max_model_len 128\)", summary[0]), summary


def test_without_a_terminal_only_the_summary_line_is_printed(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("KVIK_PROGRESS", raising=False)
    LLM(str(tiny_model_dir("llama")), device="cpu", num_kv_blocks=32, max_model_len=128)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvik:")]
    assert len(err) == 1 and err[0].startswith("kvik: ready in "), err


@pytest.mark.parametrize(("n", "text"), [(512, "512 B"), (3 << 20, "3 MiB"), (int(1.25 * (1 << 30)), "1.2 GiB")])
def test_format_bytes(n, text):
    assert progress.format_bytes(n) == text
