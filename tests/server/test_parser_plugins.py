"""Tool and reasoning parsers are found by name: the server's built-ins and a plugin's, through the hooks."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginFailure, PluginManager
from kvik_server.chat_output import ParserSettings
from kvik_server.cli import parse_serve_args
from kvik_server.context import ServerSettings
from kvik_server.parsers import load_parser, parser_registry
from kvik_server.tool_parsers.base import Extraction, ToolCall, ToolParser
from kvik_server.tool_parsers.hermes import HermesToolParser


class EchoToolParser(ToolParser):
    """A plugin's parser: the whole output is one call to ``echo`` (enough to prove the door works)."""

    name = "echo"

    def extract(self, text: str, final: bool) -> Extraction:
        return Extraction(calls=[ToolCall("echo", json.dumps({"text": text}))] if final else [])


def plugin(**parsers: str) -> types.SimpleNamespace:
    @hookimpl
    def kvik_register_tool_parsers(register):  # type: ignore[no-untyped-def]
        for name, target in parsers.items():
            register(name, target)

    return types.SimpleNamespace(KVIK_PLUGIN_API=">=2.1,<3", kvik_register_tool_parsers=kvik_register_tool_parsers)


def test_builtins_are_registered_through_the_hooks() -> None:
    manager = PluginManager(load_entrypoints=False)
    assert parser_registry("tool parser", manager).names() == ["hermes", "llama3_json", "mistral", "pythonic", "qwen"]
    assert parser_registry("reasoning parser", manager).names() == ["deepseek_r1", "qwen3"]
    assert load_parser("tool parser", "qwen", manager) is HermesToolParser
    assert parser_registry("tool parser", manager).entry("hermes").distribution == "kvik-server"


def test_a_plugin_adds_a_parser() -> None:
    manager = PluginManager(load_entrypoints=False)
    assert manager.register(plugin(echo=f"{__name__}:EchoToolParser"), "kvik-echo")
    parser = load_parser("tool parser", "echo", manager)()
    assert parser.extract("hi", final=True).calls == [ToolCall("echo", '{"text": "hi"}')]


def test_a_plugin_cannot_silently_replace_a_builtin() -> None:
    manager = PluginManager(load_entrypoints=False)
    manager.register(plugin(hermes=f"{__name__}:EchoToolParser"), "kvik-evil")
    with pytest.raises(ValueError, match="more than one plugin"):
        load_parser("tool parser", "hermes", manager)


def test_unknown_names_fail_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown tool parser 'hermez'; registered: hermes"):
        ParserSettings(tool_call_parser="hermez").validate()
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ParserSettings(reasoning_parser="o1").validate()
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ParserSettings(enable_auto_tool_choice=True).validate()
    ParserSettings(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3").validate()


def test_blocking_kvik_server_blocks_its_parsers() -> None:
    manager = PluginManager(load_entrypoints=False)
    manager.skipped.append(PluginFailure("server", "kvik-server", "listed in KVIK_DISABLE_PLUGINS"))
    with pytest.raises(ValueError, match="unknown tool parser 'hermes'; registered: none"):
        load_parser("tool parser", "hermes", manager)


def test_serve_flags_and_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("enable-auto-tool-choice: true\ntool-call-parser: llama3_json\n")
    args = parse_serve_args(["--model", "m", "--config", str(config), "--reasoning-parser", "deepseek_r1"])
    settings = ServerSettings.from_args(args)
    assert (settings.enable_auto_tool_choice, settings.tool_call_parser, settings.reasoning_parser) == (
        True, "llama3_json", "deepseek_r1")  # fmt: skip
    with pytest.raises(SystemExit):
        parse_serve_args(["--model", "m", "--tool-call-parser", "nope"])
    assert "unknown tool parser 'nope'; registered: hermes" in capsys.readouterr().err
