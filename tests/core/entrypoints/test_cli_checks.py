"""A newcomer's first commands: bad flags fail at once (no model load), errors name CLI flags,
one log-level option every subcommand honours."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from kvik.entrypoints import cli


def _kvik(*args: str, timeout: int = 120, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvik.entrypoints.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    return proc, time.monotonic() - start


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--max-model-len", "abc"], "--max-model-len"),
        (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
        (["--kv-cache-dtype", "fp4"], "--kv-cache-dtype: invalid choice: 'fp4'"),
    ],
)
def test_a_bad_flag_fails_in_under_two_seconds_without_loading_a_model(tmp_path, flags, named):
    # The model path does not exist: had the engine started, the error would be about the path.
    proc, elapsed = _kvik("generate", "hi", "--model", str(tmp_path / "no-such-model"), *flags)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and "no-such-model" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


def test_errors_from_the_cli_name_the_flag_not_the_python_keyword(tiny_model_dir):
    proc, _ = _kvik("generate", "hi", "--model", str(tiny_model_dir("llama")), "--device", "cpu",
                    "--max-model-len", "100000")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--max-model-len 100000" in proc.stderr and "--max-model-len <= 512" in proc.stderr, proc.stderr
    assert "max_model_len" not in proc.stderr


def test_cli_spelling_rewrites_keywords_with_underscores_only():
    parser = cli.build_parser()
    message = "pass max_model_len=5808 (or 'auto'), or raise kv_cache_memory; the model is fine"
    assert cli.cli_spelling(message, parser) == (
        "pass --max-model-len 5808 (or 'auto'), or raise --kv-cache-memory; the model is fine"
    )


@pytest.mark.parametrize(("argv", "default", "expected"), [
    (["--log-level", "debug", "serve"], "info", "debug"),
    (["serve", "--log-level", "error"], "info", "error"),
    (["--log-level", "DEBUG", "plugins"], "warning", "debug"),
    (["plugins"], "warning", "warning"),
])  # fmt: skip
def test_one_log_level_option_is_honoured_by_every_subcommand(monkeypatch, argv, default, expected):
    monkeypatch.delenv("KVIK_LOG_LEVEL", raising=False)
    args = cli.build_parser().parse_args(argv)
    assert cli.resolve_log_level(args, default) == expected
    cli.configure_logging(expected)
    assert logging.getLogger().level == getattr(logging, expected.upper())


def test_an_unknown_log_level_is_a_usage_error_listing_the_choices():
    proc, _ = _kvik("--log-level", "verbose", "plugins")
    assert proc.returncode == 2
    assert "verbose" in proc.stderr and "debug" in proc.stderr and "Traceback" not in proc.stderr


def test_the_environment_log_level_is_checked(monkeypatch, capsys):
    monkeypatch.setenv("KVIK_LOG_LEVEL", "loud")
    assert cli.main(["env"]) == 2
    assert "KVIK_LOG_LEVEL" in capsys.readouterr().err


def test_a_hugging_face_id_without_the_hub_is_one_clear_line(tmp_path):
    # Offline with an empty cache: the Hub id is looked up, and the failure says why in one line.
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    proc, _ = _kvik("generate", "hi", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--device", "cpu", env=env)
    assert proc.returncode == 2
    assert "model 'HuggingFaceTB/SmolLM2-135M-Instruct'" in proc.stderr and "not in the cache" in proc.stderr
    assert "Traceback" not in proc.stderr
