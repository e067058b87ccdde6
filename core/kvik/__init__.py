"""kvik: a plugin-based, hardware-agnostic LLM inference engine.

``from kvik import LLM, SamplingParams`` is the offline API; heavier modules
load on first use so that ``import kvik`` stays cheap for plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvik.inputs import TextPrompt, TokensPrompt
from kvik.lora.request import LoRARequest
from kvik.outputs import CompletionOutput, RequestOutput
from kvik.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from kvik.version import PLUGIN_API_VERSION, __version__

if TYPE_CHECKING:
    from kvik.engine.async_llm import AsyncLLM
    from kvik.engine.llm_engine import LLMEngine
    from kvik.entrypoints.llm import LLM

_LAZY = {
    "LLM": "kvik.entrypoints.llm",
    "LLMEngine": "kvik.engine.llm_engine",
    "AsyncLLM": "kvik.engine.async_llm",
    "EngineConfig": "kvik.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvik' has no attribute {name!r}")


__all__ = [
    "LLM",
    "PLUGIN_API_VERSION",
    "AsyncLLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
