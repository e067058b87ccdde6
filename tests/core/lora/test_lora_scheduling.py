"""The scheduler never puts more than max_loras adapters in one step, and every request still finishes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.lora import LoRARequest
from kvik.request import Request
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import RunnerOutput
from kvik.scheduling.scheduler import Scheduler


def _lora(i: int) -> LoRARequest | None:
    return None if i == 0 else LoRARequest(f"a{i}", i, f"/adapters/{i}")


@settings(max_examples=40, deadline=None)
@given(
    adapters=st.lists(st.integers(0, 5), min_size=1, max_size=24),
    max_loras=st.integers(1, 3),
    num_blocks=st.integers(12, 40),
    policy=st.sampled_from(["fcfs", "priority"]),
    slow_reads=st.integers(0, 3),
)
def test_at_most_max_loras_adapters_per_step(adapters: list[int], max_loras: int, num_blocks: int, policy: str,
                                             slow_reads: int) -> None:  # fmt: skip
    sched = Scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32, max_num_seqs=6,
                      max_model_len=64, policy=policy, max_loras=max_loras)  # fmt: skip
    steps = [0]
    if slow_reads:  # some adapters' background reads run for a while: requests wait, and still all finish
        sched.lora_loading = lambda i: i % 4 < slow_reads and steps[0] < 3 * i
    for n, a in enumerate(adapters):
        prompt = [3 + (n % 4)] * (5 + n % 9)  # shared prefixes across adapters: hashes must keep them apart
        request = Request(f"r{n}", prompt, SamplingParams(), max_tokens=4, priority=n % 3, lora_request=_lora(a))
        sched.add_request(request)
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        steps[0] += 1
        assert out.scheduled  # never an empty step while requests wait
        ids = {s.lora_request.lora_int_id for s in out.scheduled if s.lora_request is not None}
        assert len(ids) <= max_loras
        order = [s.lora_request.lora_int_id if s.lora_request else 0 for s in out.scheduled]
        assert order == sorted(order)  # one adapter's rows side by side (the kernels' tiles like it)
        for s in out.scheduled:
            assert s.lora_request == sched.requests[s.request_id].lora_request
        sched.update_from_output(out, RunnerOutput({s.request_id: [7] for s in out.scheduled if s.sample}))
    assert not sched.has_unfinished_requests()


def test_blocks_are_keyed_by_adapter() -> None:
    sched = Scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64,
                      max_loras=2)  # fmt: skip
    prompt = list(range(10, 23))
    reqs = [Request(f"r{i}", prompt, SamplingParams(), max_tokens=1, lora_request=_lora(i % 3)) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, RunnerOutput({s.request_id: [7] for s in out.scheduled if s.sample}))
    # r0..r2 computed their prompts; r3..r5 (the same three "models") hit only their own blocks.
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 0, 12, 12, 12]
    firsts = [sched.kv_cache.block_hashes(Request(f"x{i}", prompt, SamplingParams(), 1, lora_request=_lora(i)))[0]
              for i in range(3)]  # fmt: skip
    assert len(set(firsts)) == 3


def test_requests_wait_for_an_adapter_still_being_read_unless_the_step_is_empty() -> None:
    sched = Scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64,
                      max_loras=4)  # fmt: skip
    loading = {2}  # adapter 2's background read has not finished
    sched.lora_loading = loading.__contains__
    reading = Request("reading", [5] * 6, SamplingParams(), max_tokens=3, lora_request=_lora(2))
    sched.add_request(reading)
    # Nothing else to run: the step takes it anyway (the runner waits for the read; no empty steps).
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["reading"]
    sched.update_from_output(out, RunnerOutput({"reading": [7]}))
    # Running now (its adapter is in the step), so it runs on; a new request of an adapter still
    # being read waits while the step has other work, and requests behind it still start.
    loading.add(3)
    later = Request("later", [6] * 6, SamplingParams(), max_tokens=3, lora_request=_lora(3))
    base = Request("base", [7] * 6, SamplingParams(), max_tokens=3)
    sched.add_request(later)
    sched.add_request(base)
    out = sched.schedule()
    assert sorted(s.request_id for s in out.scheduled) == ["base", "reading"]
    assert sched.waiting.peek() is later  # kept its place
    sched.update_from_output(out, RunnerOutput({s.request_id: [7] for s in out.scheduled if s.sample}))
    loading.discard(3)  # the read finished
    out = sched.schedule()
    assert "later" in {s.request_id for s in out.scheduled}
