"""In-memory storage of Responses API results, for ``previous_response_id`` and GET /v1/responses/{id}.

Bounded two ways, so a long-running server cannot grow without limit: at most ``max_entries``
responses (the least recently stored goes first) and each lives ``ttl_seconds`` after it was
stored. Nothing survives a restart; a client that needs that keeps its own history and sends
it as ``input`` instead.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1000
DEFAULT_TTL_SECONDS = 3600.0


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as returned to the client
    messages: list[dict[str, Any]]  # the conversation (chat messages, instructions excluded) incl. its output
    expires_at: float  # clock() time


class ResponseStore:
    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError(f"a response store needs max_entries >= 1 and ttl_seconds > 0, "
                             f"got {max_entries} and {ttl_seconds}")  # fmt: skip
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._expire()
        self._entries.pop(response_id, None)
        self._entries[response_id] = StoredResponse(response, messages, self._clock() + self.ttl_seconds)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None if it was never stored, was evicted or has expired."""
        self._expire()
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._expire()
        return self._entries.pop(response_id, None) is not None

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _expire(self) -> None:
        # Entries are in storing order and share one TTL, so the expired ones are at the front.
        now = self._clock()
        while self._entries:
            first = next(iter(self._entries.values()))
            if first.expires_at > now:
                break
            self._entries.popitem(last=False)
