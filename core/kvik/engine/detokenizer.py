"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (a character may span
several tokens, and a token's leading space depends on its neighbour), and
decoding everything every step is quadratic. We keep two offsets into the
token list and decode only a short window: text is emitted once the window's
decoding grows and does not end in an incomplete UTF-8 sequence (U+FFFD).
"""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context so the first output token decodes with
# the right leading space.
_PROMPT_CONTEXT = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's sampled token ids into text, watching for stop strings."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.output_text = ""
        self.stop_reason: str | None = None
        # transformers' decode() walks every id in Python before calling the
        # Rust tokenizer; call the Rust one directly when there is one.
        backend = getattr(tokenizer, "_tokenizer", None)
        # (Only when transformers would not post-process the text.)
        cleanup = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = getattr(backend, "decode", None) if not cleanup else None
        # decode of ids[prefix_offset:read_offset], kept across tokens
        self._prefix_text = self._decode(self._ids[: self._read_offset])
        # While streaming, hold back text that could be the start of a stop string.
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)  # type: ignore[no-any-return]
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # type: ignore[no-any-return]

    def _advance(self) -> None:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that ended the text, if any."""
        for token_id in new_token_ids:
            self._ids.append(token_id)
            full_text = self._decode(self._ids[self._prefix_offset :])
            if len(full_text) <= len(self._prefix_text) or full_text.endswith(_REPLACEMENT):
                continue  # an incomplete character: wait for the next token
            before = len(self.output_text)
            self.output_text += full_text[len(self._prefix_text) :]
            self._advance()
            if self.stop and self._check_stop(before):
                return self.stop_reason
        return None

    def _check_stop(self, new_text_start: int) -> bool:
        # A stop string may straddle old and new text: search from just before the new part.
        search_from = max(0, new_text_start - self._holdback)
        best: tuple[int, str] | None = None
        for s in self.stop:
            index = self.output_text.find(s, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, s)
        if best is None:
            return False
        index, s = best
        self.output_text = self.output_text[: index + len(s) if self.include_stop_str_in_output else index]
        self.stop_reason = s
        return True

    def text(self, finished: bool) -> str:
        """The text so far; while unfinished, minus a tail that may become a stop string."""
        if finished or not self.stop or self._holdback == 0:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self._holdback)]

    def flush(self) -> None:
        """At the end, emit whatever is still undecoded (e.g. a dangling partial character)."""
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(self._prefix_text) and self.stop_reason is None:
            self.output_text += full_text[len(self._prefix_text) :]
            self._advance()
