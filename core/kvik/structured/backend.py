"""The seam for structured-output backends (xgrammar built in; others register via a plugin hook)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import numpy as np


class FeatureNotEnabledError(ValueError):
    """A request needs a feature this installation lacks (e.g. no structured-output backend).

    ``str(exc)`` is the whole story for an offline user (what is missing and how to install
    it); a server tells its client only :attr:`client_message` (a 501: not the client's
    fault, nothing it can install) and logs :attr:`operator_hint` for whoever runs it.
    """

    def __init__(self, client_message: str, operator_hint: str) -> None:
        super().__init__(f"{client_message}; {operator_hint}")
        self.client_message = client_message
        self.operator_hint = operator_hint


# Constraint kinds, as in SamplingParams.guided (vLLM's StructuredOutputsParams names).
KINDS = ("json", "regex", "choice", "grammar", "json_object")


class GrammarMatcher(Protocol):
    """One request's grammar state; advances with each accepted token (call from one thread at a time)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged) if the grammar forbids it."""
        ...

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` ([words] int32, bit t%32 of word t//32)."""
        ...

    def is_terminated(self) -> bool:
        """True once the grammar accepted a stop token: the request is complete."""
        ...


class StructuredOutputBackend(ABC):
    """Compiles constraints for one tokenizer and makes per-request matchers.

    Built once per engine (lazily, on the first structured request) with the
    engine's tokenizer, the model's vocabulary size (which may exceed the
    tokenizer's) and its EOS ids. ``compile`` must be thread-safe: engines call
    it from request-admission threads. The engine caches compiled results.
    """

    name: ClassVar[str]

    @abstractmethod
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        """Raise ImportError (with the package to install) if the backend's library is missing."""

    @abstractmethod
    def compile(self, kind: str, spec: Any) -> Any:
        """Compile a constraint (``kind`` in KINDS; ``spec`` a normalised string, or a list for choice).

        Raises ValueError with the compiler's message when the spec is invalid.
        """

    @abstractmethod
    def new_matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the start of ``compiled``'s grammar."""

    @abstractmethod
    def allocate_bitmask(self, rows: int) -> np.ndarray:
        """A [rows, ceil(vocab / 32)] int32 buffer for ``GrammarMatcher.fill_bitmask``."""
