"""Host time of the scheduler and the runner's block tables per decode step, at long contexts with windows.

    python benchmarks/scheduler_host_time.py                 # 64 requests of 32k tokens: one table, 7 groups
    python benchmarks/scheduler_host_time.py --requests 16 --context 8192

No model and no device: a Scheduler and a BlockTables (what a runner keeps) driven through the prompts,
then through ``--steps`` decode steps, timed. Three setups: one table of global layers; seven KV-cache
groups (one global, six sliding with ``--window``, the Gemma 3 pattern); the same groups with the whole
table resent to the runner at every release (what the scheduler did before 2026-12-05), for comparison in
the same run.
"""

from __future__ import annotations

import argparse
import json
import time

from kvik.request import Request
from kvik.sampling_params import SamplingParams
from kvik.scheduling.kv_cache_manager import KVCacheManager, blocks_held_at_most
from kvik.scheduling.output import RunnerOutput
from kvik.scheduling.scheduler import Scheduler
from kvik.worker.kit import BlockTables


def run(args: argparse.Namespace, windows: tuple[int | None, ...], resend: bool) -> dict[str, object]:
    bs, step_tokens = 16, 4096  # prompts go in chunks of 4,096 tokens
    per_request = blocks_held_at_most(args.context + args.steps + bs, bs, windows, step_tokens)
    sched = Scheduler(num_blocks=args.requests * per_request + 1, block_size=bs, max_num_batched_tokens=step_tokens,
                      max_num_seqs=args.requests, max_model_len=args.context + 1024, enable_prefix_caching=False,
                      group_windows=windows)  # fmt: skip
    if resend:  # the old protocol: every release sends the runner the whole table again
        release = KVCacheManager.release_behind_window

        def release_and_resend(kv: KVCacheManager, request: Request) -> bool:
            done = release(kv, request)
            if done:
                sched._sent_blocks.pop(request.request_id, None)
            return done

        sched.kv_cache.release_behind_window = release_and_resend.__get__(sched.kv_cache)  # type: ignore[method-assign]
    tables = BlockTables(num_groups=len(windows))
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    for i in range(args.requests):
        n = args.context - 8 * i  # staggered: the requests cross block boundaries on different steps
        sched.add_request(Request(f"r{i}", [5] * n, params, max_tokens=10**6, eos_token_ids=frozenset()))

    def one_step() -> int:
        out = sched.schedule()
        tables.apply(out)
        sampled = {r.request_id: [7] for r in out.scheduled if r.sample}
        sched.update_from_output(out, RunnerOutput(sampled_token_ids=sampled))
        return sum(len(r.new_block_ids) for r in out.scheduled)

    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.requests.values()):
        one_step()
    start, ids = time.perf_counter(), 0
    for _ in range(args.steps):
        ids += one_step()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    return {"groups": len(windows), "resend_on_release": resend, "ms_per_step": round(ms, 3),
            "block_ids_sent_per_step": round(ids / args.steps, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    gemma = (None,) + (args.window,) * 6
    for windows, resend in (((None,), False), (gemma, False), (gemma, True)):
        print(json.dumps({**run(args, windows, resend), "requests": args.requests, "context": args.context}))


if __name__ == "__main__":
    main()
