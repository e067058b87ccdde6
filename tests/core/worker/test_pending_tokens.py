"""TorchModelRunner.fill_pending_tokens: the steady-state fast path (one slice copy) and the general
gather give the same input ids as the definition (pending row i <- the last step's sample of its request)."""

from __future__ import annotations

import random

import pytest
import torch
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput
from kvik.worker.kit import BlockTables, StepLayout
from kvik.worker.torch_runner import TorchModelRunner


def _runner(last_ids: list[str], last_sampled: list[int]) -> TorchModelRunner:
    runner = TorchModelRunner.__new__(TorchModelRunner)  # only the pending-token state is needed
    runner.device = torch.device("cpu")
    runner._last_ids = list(last_ids)
    runner._last_sampled = torch.tensor(last_sampled, dtype=torch.int64)
    return runner


def _layout(reqs: list[ScheduledRequest]) -> StepLayout:
    tables = BlockTables()
    rows = tables.apply(SchedulerOutput(reqs, sum(len(r.token_ids) for r in reqs)))
    return StepLayout.build(reqs, tables, rows, 4)


def _req(rid: str, tokens: list[int], start: int, pending: int) -> ScheduledRequest:
    return ScheduledRequest(
        rid, tokens, start, list(range(1, 2 + (start + len(tokens)) // 4)), True, SamplingParams(),
        num_pending_tokens=pending,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(30))
def test_pending_tokens_land_on_their_rows(seed: int) -> None:
    rng = random.Random(seed)
    last_ids = [f"r{i}" for i in range(rng.randint(1, 8))]
    last_sampled = [rng.randint(100, 999) for _ in last_ids]
    case = seed % 3
    if case == 0:  # the steady decode: the same requests in the same order (the fast path)
        ids = list(last_ids)
    elif case == 1:  # a prefix of them, then a newcomer with no pending token
        ids = [*last_ids[: rng.randint(1, len(last_ids))], "new"]
    else:  # reordered and thinned out (the general gather)
        ids = rng.sample(last_ids, rng.randint(1, len(last_ids)))
    reqs = []
    for rid in ids:
        if rid == "new":
            reqs.append(_req(rid, [rng.randint(1, 50) for _ in range(rng.randint(1, 5))], 0, 0))
        elif rng.random() < 0.3:  # a prefill chunk whose last token is the pending one
            reqs.append(_req(rid, [rng.randint(1, 50) for _ in range(rng.randint(1, 3))] + [0], 3, 1))
        else:
            reqs.append(_req(rid, [0], rng.randint(1, 20), 1))
    layout = _layout(reqs)
    input_ids = torch.from_numpy(layout.token_ids.copy())
    _runner(last_ids, last_sampled).fill_pending_tokens(input_ids, layout)
    expected = []
    for r in reqs:
        tokens = list(r.token_ids)
        if r.num_pending_tokens:
            tokens[-1] = last_sampled[last_ids.index(r.request_id)]
        expected.extend(tokens)
    assert input_ids.tolist() == expected


def test_a_pending_token_nobody_sampled_is_an_error() -> None:
    layout = _layout([_req("a", [0], 5, 1), _req("b", [0], 5, 1)])
    with pytest.raises(RuntimeError, match="'b' has a pending token"):
        _runner(["a"], [7]).fill_pending_tokens(torch.zeros(2, dtype=torch.int64), layout)
