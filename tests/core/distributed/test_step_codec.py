"""Steps sent to worker processes as token deltas decode to exactly the engine's SchedulerOutput."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.executor.step_codec import StepDecoder, StepEncoder
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

# One engine step: for some live requests, (request index, tokens appended before it, finish after it).
actions = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.booleans()), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(actions, min_size=1, max_size=25))
def test_decoded_steps_equal_the_engines(steps: list[list[tuple[int, int, bool]]]) -> None:
    encoder, decoder = StepEncoder(), StepDecoder()
    live: dict[str, tuple[list[int], list[int]]] = {}
    finished: list[str] = []
    generation = 0
    for step in steps:
        scheduled = []
        for index, appended, _ in step:
            rid = f"r{index}"
            if rid not in live:  # a new request (or an id used again after it finished)
                generation += 1
                live[rid] = ([generation, index, 7], [])
            live[rid][1].extend(range(appended))
            if rid in {r.request_id for r in scheduled}:
                continue
            scheduled.append(ScheduledRequest(rid, [1], 0, [], True, SamplingParams(), live[rid][0], live[rid][1]))
        out = SchedulerOutput(scheduled, len(scheduled), finished_request_ids=finished)
        # Through pickle, as the multiprocess executor sends it.
        decoded = decoder.decode(pickle.loads(pickle.dumps(encoder.encode(out))))
        assert [(r.request_id, r.prompt_token_ids, r.output_token_ids) for r in decoded.scheduled] == [
            (r.request_id, r.prompt_token_ids, r.output_token_ids) for r in scheduled
        ]
        finished = sorted({f"r{i}" for i, _, done in step if done})
        for rid in finished:
            live.pop(rid, None)

