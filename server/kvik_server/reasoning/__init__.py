"""Reasoning parsers: separate a reasoning model's thinking from its answer (``--reasoning-parser``)."""

from kvik_server.reasoning.base import ReasoningParser, ReasoningSplit

__all__ = ["ReasoningParser", "ReasoningSplit"]
