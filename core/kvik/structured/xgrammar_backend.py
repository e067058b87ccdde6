"""Structured output through xgrammar (https://github.com/mlc-ai/xgrammar).

xgrammar compiles a grammar against the tokenizer's vocabulary once (cached
by the engine), then per request a ``GrammarMatcher`` walks a pushdown
automaton and fills a packed allowed-token bitmask in microseconds per token.
Every matcher is wrapped in a :class:`~kvik.structured.utf8.Utf8Guard`: xgrammar
admits surrogate encodings (``ED A0..BF xx``) as characters, which no decoder does.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from kvik.structured.backend import GrammarMatcher, StructuredOutputBackend
from kvik.structured.utf8 import Utf8Guard, Utf8Table


class _Matcher:
    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._m.is_terminated())


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (JSON string escapes are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def json_string_fix(ebnf: str) -> str:
    r"""Forbid raw control characters inside length-bounded JSON strings.

    xgrammar 0.2.8 writes ``maxLength`` strings as ``[^"\\\r\n]{0,n}``, which
    admits U+0000-U+001F (invalid JSON: ``json.loads`` rejects them); its
    unbounded strings already exclude them. A no-op once xgrammar fixes it.
    """
    return ebnf.replace(r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]")


class XGrammarBackend(StructuredOutputBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        try:
            import xgrammar
        except ImportError as exc:
            raise ImportError(
                f"structured output backend 'xgrammar' could not import the xgrammar package ({exc}): "
                "`pip install xgrammar` (on a CPU-only torch: `pip install --no-deps xgrammar apache-tvm-ffi` "
                "plus pydantic)"
            ) from exc
        self._xgr = xgrammar
        hf_tokenizer = getattr(tokenizer, "hf_tokenizer", tokenizer)  # kvik wrappers may hold the HF one
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids) or None
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        # decoded_vocab: each token's raw output bytes (byte-level and byte-fallback vocabularies alike).
        self.utf8 = Utf8Table.build(info.decoded_vocab, vocab_size, info.stop_token_ids)

    def compile(self, kind: str, spec: Any) -> Any:
        try:
            if kind == "json":
                # No free whitespace: a weak model cannot stall in endless whitespace
                # (vLLM's disable_any_whitespace).
                grammar = str(self._xgr.Grammar.from_json_schema(spec, any_whitespace=False))
                return self.compiler.compile_grammar(json_string_fix(grammar))
            if kind == "json_object":
                # OpenAI's json_object means an object (xgrammar's builtin JSON grammar also admits arrays).
                return self.compile("json", {"type": "object"})
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(spec))
            if kind == "grammar":
                return self.compiler.compile_grammar(spec)
        except Exception as exc:  # xgrammar raises RuntimeError / InvalidJSONError with the parser's message
            # Drop xgrammar's "[hh:mm:ss] /path/file.cc:123: " log prefix; keep the parser's message.
            message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", " ".join(str(exc).split()))
            raise ValueError(f"invalid guided_{kind}: {message or type(exc).__name__}") from exc
        raise ValueError(f"unknown structured-output kind {kind!r}; expected one of json, regex, choice, grammar")

    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        return Utf8Guard(_Matcher(self._xgr.GrammarMatcher(compiled)), self.utf8)

    def allocate_bitmask(self, rows: int) -> np.ndarray:
        return np.full((rows, (self.vocab_size + 31) // 32), -1, dtype=np.int32)
