"""Back-pressure at the door: ``--max-waiting-requests`` caps the sequences that would wait for the batch.

The engine's own counts cannot decide admission under a burst: they change only after its next step,
so every request of a simultaneous burst would read "0 waiting". The server therefore keeps its own
ledger of the requests it admitted and has not seen finish, in admission order, and estimates which of
them the running batch holds the way the FCFS scheduler fills it: in order, while a sequence seat
(``max_num_seqs``) and the KV blocks its prompt needs (plus one for its first token) are free; from the
first one that does not fit, the rest wait. A request is refused with 503 + Retry-After when admitting
it would leave more than ``max_waiting_requests`` sequences waiting (by this estimate, or by the engine's
last reported count if that is higher, e.g. after preemptions).

The estimate uses each prompt's blocks at admission, not its growth while decoding, and shares prompt
blocks only among the ``n`` sequences of one request (identical prompts of different requests also share
blocks through the prefix cache): it may count a few sequences as running that in fact wait, never the
other way round by more than that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class KVCapacity:
    """What the KV cache holds: usable blocks, tokens per block, whether prompts share blocks."""

    num_blocks: int
    block_size: int
    prefix_caching: bool = True

    def blocks_for(self, prompt_len: int, n: int) -> int:
        """Blocks ``n`` sequences of a ``prompt_len``-token prompt need to produce their first token."""
        if n <= 0:
            return 0
        full = prompt_len // self.block_size  # full prompt blocks, shared by the n sequences when cached
        return full + n if self.prefix_caching else n * (full + 1)

    def seqs_fitting(self, prompt_len: int, n: int, free_blocks: int) -> int:
        """How many of ``n`` such sequences ``free_blocks`` blocks can start (0..n)."""
        full = prompt_len // self.block_size
        fitting = free_blocks - full if self.prefix_caching else free_blocks // (full + 1)
        return max(0, min(n, fitting))


class AdmissionLedger:
    """Admitted, unfinished requests in admission order, and the sequences of them that would wait."""

    def __init__(self, max_num_seqs: int | None, kv: KVCapacity | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.kv = kv
        self._entries: dict[str, tuple[int, int]] = {}  # request id -> (prompt_len, n), in admission order

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, request_id: str, prompt_len: int, n: int) -> None:
        self._entries[request_id] = (prompt_len, n)

    def remove(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def num_waiting(self, extra: Sequence[tuple[int, int]] = ()) -> int:
        """Sequences that would wait if the ``extra`` (prompt_len, n) requests were admitted after the others."""
        seats = self.max_num_seqs
        blocks = self.kv.num_blocks if self.kv is not None else 0
        waiting = 0
        for prompt_len, n in [*self._entries.values(), *extra]:
            running = n if seats is None else min(n, seats)
            if self.kv is not None:
                running = self.kv.seqs_fitting(prompt_len, running, blocks)
                blocks -= self.kv.blocks_for(prompt_len, running)
            if seats is not None:
                seats -= running
            waiting += n - running
            if running < n:  # FCFS: once the head of the queue waits, everything behind it waits
                seats, blocks = 0, 0
        return waiting
