"""Runner logprob entries -> user-facing ``{token_id: Logprob(logprob, rank, decoded_token)}``."""

from __future__ import annotations

from typing import Any

from kvik.outputs import Logprob


class LogprobsProcessor:
    """Ranks and decodes logprob entries (vLLM's order: the chosen token first, then the top k)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._decoded: dict[int, str | None] = {}  # token id -> its text, decoded once per engine

    def decode(self, token_id: int) -> str | None:
        if token_id not in self._decoded:
            self._decoded[token_id] = None if self.tokenizer is None else self.tokenizer.decode([token_id])
        return self._decoded[token_id]

    def make(self, entry: dict[int, float], chosen: int, chosen_rank: int | None, k: int) -> dict[int, Logprob]:
        """One position's entry: ``chosen`` plus the top ``k``; ranks are 1-based in the raw distribution.

        ``chosen_rank`` comes from the runner; when a runner gives none, the
        chosen token's rank is known only if it is among the top ``k``.
        """
        ordered = sorted(entry, key=lambda t: -entry[t])
        if chosen_rank is None and chosen in ordered[:k]:
            chosen_rank = ordered.index(chosen) + 1
        out = {chosen: Logprob(entry[chosen], chosen_rank, self.decode(chosen))}
        rank = 0
        for token in ordered:
            if token == chosen:
                continue
            rank += 1
            if chosen_rank is not None and rank >= chosen_rank:
                rank_shown = rank + 1  # the chosen token sits at chosen_rank
            else:
                rank_shown = rank
            if rank > k:
                break
            out[token] = Logprob(entry[token], rank_shown, self.decode(token))
        return out
