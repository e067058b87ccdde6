"""`kvik serve` flags: sizes, YAML config files with command-line overrides, env API key, mounting."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from kvik_server.cli import add_serve_arguments, apply_config_file, engine_kwargs, parse_serve_args, parse_size
from kvik_server.context import ServerSettings


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1 << 20), ("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("64k", 64_000),
     ("64KiB", 64 << 10), ("3 gib", 3 << 30), ("10b", 10)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "2XB", "1.2.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size(text)


def test_config_file_with_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: /models/a\nmax-num-seqs: 8\nkv_cache_memory: 1GiB\nport: 9000\n"
        "enable-prefix-caching: false\napi-key: from-file\n"
    )
    args = parse_serve_args(["--config", str(config), "--port", "9100", "--max-waiting-requests", "3",
                             "--max-model-len", "auto"])  # fmt: skip
    assert args.model == "/models/a" and args.max_num_seqs == 8 and args.kv_cache_memory == 1 << 30
    assert args.port == 9100  # the command line wins over the file
    assert args.enable_prefix_caching is False and args.max_waiting_requests == 3
    kwargs = engine_kwargs(args)
    assert kwargs == {"model": "/models/a", "dtype": "auto", "max_num_seqs": 8, "kv_cache_memory": 1 << 30,
                      "enable_prefix_caching": False, "max_model_len": "auto"}  # fmt: skip
    settings = ServerSettings.from_args(args)
    assert settings.api_keys == ("from-file",) and settings.max_waiting_requests == 3


def test_scheduling_flags_reach_the_engine() -> None:
    assert "async_scheduling" not in engine_kwargs(parse_serve_args(["--model", "/m"]))  # the platform decides
    kwargs = engine_kwargs(parse_serve_args(["--model", "/m", "--no-async-scheduling", "--enforce-eager"]))
    assert kwargs["async_scheduling"] is False and kwargs["enforce_eager"] is True
    assert engine_kwargs(parse_serve_args(["--model", "/m", "--async-scheduling"]))["async_scheduling"] is True


def test_platform_options_reach_the_engine() -> None:
    assert "platform_options" not in engine_kwargs(parse_serve_args(["--model", "/m"]))
    args = parse_serve_args(["--model", "/m", "--platform-option", "onnx_model=auto", "--platform-option", "num_threads=2"])
    assert engine_kwargs(args)["platform_options"] == {"onnx_model": "auto", "num_threads": 2}


def test_kv_cache_dtype_flag_reaches_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    assert "kv_cache_dtype" not in engine_kwargs(parse_serve_args(["--model", "/m"]))  # "auto": the engine default
    assert engine_kwargs(parse_serve_args(["--model", "/m", "--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    with pytest.raises(SystemExit):
        parse_serve_args(["--model", "/m", "--kv-cache-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_lora_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_serve_args(["--model", "/m", "--enable-lora", "--lora-modules", "a=/ad/a", '{"name": "b", "path": "/ad/b"}',
                             "--max-loras", "4", "--max-lora-rank", "64", "--allow-runtime-lora-updating"])  # fmt: skip
    kwargs = engine_kwargs(args)
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"]) == (True, 4, 64)
    settings = ServerSettings.from_args(args)
    assert settings.lora_modules == ("a=/ad/a", '{"name": "b", "path": "/ad/b"}') and settings.allow_runtime_lora_updating
    with pytest.raises(SystemExit):
        parse_serve_args(["--model", "/m", "--lora-modules", "no-equals-sign"])
    assert "use name=path" in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max-num-seq: 8\n")
    with pytest.raises(SystemExit):
        parse_serve_args(["--config", str(config), "--model", "m"])
    err = capsys.readouterr().err
    assert "max-num-seq" in err and "max-num-seqs" in err


def test_api_key_from_env_and_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVIK_API_KEY", "env-key")
    args = parse_serve_args([])
    assert args.api_key == "env-key"
    assert args.model  # the bundled default model (kvik.models.default) ...
    assert args.served_model_name == Path(args.model).stem  # ... served under its file name
    assert parse_serve_args(["--api-key", "cli-key"]).api_key == "cli-key"  # the flag wins


def test_mounted_in_kvik_cli(tmp_path: Path) -> None:
    """The `kvik` CLI mounts `serve` with add_serve_arguments; run_server applies --config itself."""
    from kvik.entrypoints.cli import build_parser

    config = tmp_path / "serve.yaml"
    config.write_text("max-num-seqs: 4\nport: 9001\n")
    args = build_parser().parse_args(["serve", "--model", "m", "--config", str(config), "--port", "9002"])
    args = apply_config_file(args)
    assert (args.max_num_seqs, args.port, args.model) == (4, 9002, "m")
    parser = add_serve_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).host == "127.0.0.1"  # loopback unless asked otherwise


def test_trust_request_chat_template_flag(tmp_path: Path) -> None:
    assert ServerSettings.from_args(parse_serve_args(["--model", "/m"])).trust_request_chat_template is False
    args = parse_serve_args(["--model", "/m", "--trust-request-chat-template"])
    assert ServerSettings.from_args(args).trust_request_chat_template is True
    config = tmp_path / "serve.yaml"
    config.write_text("trust-request-chat-template: true\n")
    args = parse_serve_args(["--config", str(config), "--model", "/m"])
    assert ServerSettings.from_args(args).trust_request_chat_template is True
    assert "trust_request_chat_template" not in engine_kwargs(args)


def test_deterministic_flag_reaches_the_engine() -> None:
    assert "deterministic" not in engine_kwargs(parse_serve_args(["--model", "/m"]))  # the engine's default (off)
    assert engine_kwargs(parse_serve_args(["--model", "/m", "--deterministic"]))["deterministic"] is True


def test_serve_freezes_the_startup_heap(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvik serve` moves what start-up built out of the collector's sight before it serves."""
    import gc

    from kvik_server import shutdown
    from kvik_server.cli import run_server

    seen: dict[str, int] = {}

    def run(self: shutdown.GracefulServer) -> None:  # instead of serving: look at the heap
        seen["frozen"] = gc.get_freeze_count()
        asyncio.run(self.ctx.engine.shutdown())

    monkeypatch.setattr(shutdown.GracefulServer, "run", run)
    gc.unfreeze()
    try:
        assert run_server(parse_serve_args(["--model", str(tiny_model), "--max-model-len", "256"])) == 0
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert seen["frozen"] > 1000
