"""Waiting queues: FCFS and priority order, prepend after preemption, removal."""

from __future__ import annotations

import pytest
from kvik.scheduling.request_queue import FCFSQueue, PriorityQueue, create_request_queue
from sched_harness import make_request


def _ids(queue) -> list[str]:
    return [r.request_id for r in queue]


def test_fcfs_order_and_prepend() -> None:
    q = create_request_queue("fcfs")
    assert isinstance(q, FCFSQueue) and not q
    a, b, c = (make_request(x, [1]) for x in "abc")
    for r in (a, b, c):
        q.add(r)
    assert q.peek() is a and len(q) == 3
    assert q.pop() is a
    q.prepend(a)  # preempted: back to the front
    assert _ids(q) == ["a", "b", "c"]
    q.remove(b)
    assert _ids(q) == ["a", "c"]
    with pytest.raises(ValueError):
        q.remove(b)


def test_priority_order_lower_value_first_then_arrival() -> None:
    q = create_request_queue("priority")
    assert isinstance(q, PriorityQueue)
    reqs = [
        make_request("late-urgent", [1], priority=0, arrival_time=5.0),
        make_request("early-normal", [1], priority=1, arrival_time=1.0),
        make_request("early-urgent", [1], priority=0, arrival_time=2.0),
        make_request("lazy", [1], priority=3, arrival_time=0.0),
    ]
    for r in reqs:
        q.add(r)
    assert _ids(q) == ["early-urgent", "late-urgent", "early-normal", "lazy"]
    first = q.pop()
    assert first.request_id == "early-urgent"
    q.prepend(first)  # keeps its key: still first
    assert q.peek() is first
    q.remove(reqs[1])
    assert [q.pop().request_id for _ in range(len(q))] == ["early-urgent", "late-urgent", "lazy"]
    with pytest.raises(ValueError, match="not waiting"):
        q.remove(reqs[1])


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="fcfs, priority"):
        create_request_queue("lifo")
