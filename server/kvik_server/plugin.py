"""kvik-server's own tool and reasoning parsers, registered through the same hooks as any plugin's.

It is kvik-server's entry point in the ``kvik`` group (``server``), so a plugin naming a
parser the same way conflicts with the built-in one instead of silently replacing it, and
``kvik plugins`` lists the parsers. :func:`kvik_server.parsers.parser_registry` registers it
itself when the entry point was not loaded (an older install's metadata, a fresh test manager).
"""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.1,<3"


@hookimpl
def kvik_register_tool_parsers(register: RegisterFn) -> None:
    register("hermes", "kvik_server.tool_parsers.hermes:HermesToolParser")
    register("qwen", "kvik_server.tool_parsers.hermes:HermesToolParser")  # Qwen 2.5 / 3 use Hermes' format
    register("llama3_json", "kvik_server.tool_parsers.llama3_json:Llama3JsonToolParser")
    register("mistral", "kvik_server.tool_parsers.mistral:MistralToolParser")
    register("pythonic", "kvik_server.tool_parsers.pythonic:PythonicToolParser")


@hookimpl
def kvik_register_reasoning_parsers(register: RegisterFn) -> None:
    register("deepseek_r1", "kvik_server.reasoning.think:DeepSeekR1ReasoningParser")
    register("qwen3", "kvik_server.reasoning.think:Qwen3ReasoningParser")
