"""Waiting queues: the scheduling policy is the order in which waiting requests are admitted.

``fcfs``: arrival order; a preempted request goes back to the front.
``priority``: lowest ``priority`` value first (as in vLLM), then earliest
arrival; a preempted request simply re-enters with its original key, which puts
it ahead of everything that arrived after it at the same priority.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from kvik.request import Request

POLICIES = ("fcfs", "priority")


class RequestQueue(ABC):
    """The waiting requests, in admission order."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Enqueue a newly arrived request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Re-enqueue a preempted request ahead of the requests that arrived after it."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to admit (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return :meth:`peek`."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Remove a request anywhere in the queue (abort); ValueError if absent."""

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """All waiting requests, in admission order."""

    @abstractmethod
    def __len__(self) -> int: ...

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(RequestQueue):
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._q.append(request)

    def prepend(self, request: Request) -> None:
        self._q.appendleft(request)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, request: Request) -> None:
        self._q.remove(request)  # O(n): aborts are rare next to steps

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)


class PriorityQueue(RequestQueue):
    """Heap of ``(priority, arrival_time, seq, request)``; ``seq`` breaks ties in insertion order."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._seq), request))

    def prepend(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)  # O(n): aborts are rare next to steps
                return
        raise ValueError(f"request {request.request_id!r} is not waiting")

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))

    def __len__(self) -> int:
        return len(self._heap)


def create_request_queue(policy: str) -> RequestQueue:
    """The waiting queue for a scheduling policy name ("fcfs" or "priority")."""
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
