"""64 concurrent streamed chats through the server equal the same requests run alone offline (greedy)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from kvik.entrypoints.llm import LLM
from kvik.sampling_params import SamplingParams
from server_harness import MAX_MODEL_LEN, ServerProcess

NUM_REQUESTS = 64
TOPICS = ["fox", "dog", "cache", "blocks", "batching", "CPU", "story", "café", "日本語", "hello", "world", "time"]


def conversation(i: int) -> list[dict[str, str]]:
    topic = TOPICS[i % len(TOPICS)]
    messages = [{"role": "user", "content": f"Tell me about the {topic} number {i}."}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    return messages


def max_tokens(i: int) -> int:
    return 4 + (i * 5) % 13  # different lengths so requests join and leave the batch at different steps


async def stream_all(server: ServerProcess) -> list[tuple[str, str | None, int]]:
    client = server.async_openai()

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model="tiny", messages=conversation(i), max_tokens=max_tokens(i), temperature=0.0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish, tokens

    try:
        return list(await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS))))
    finally:
        await client.close()


def test_64_concurrent_streams_match_offline(server: ServerProcess, tiny_model: Path) -> None:
    start = time.monotonic()
    served = asyncio.run(stream_all(server))
    print(f"64 streams served in {time.monotonic() - start:.1f}s")
    llm = LLM(model=str(tiny_model), device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=NUM_REQUESTS)
    params = [SamplingParams(max_tokens=max_tokens(i), temperature=0.0) for i in range(NUM_REQUESTS)]
    # One offline batch of all 64 (batch composition differs from the server's 16-wide batches) ...
    batched = llm.chat([conversation(i) for i in range(NUM_REQUESTS)], params)
    for i, (text, finish, tokens) in enumerate(served):
        ref = batched[i].outputs[0]
        assert text == ref.text, f"request {i}: served {text!r} != offline {ref.text!r}"
        assert finish == ref.finish_reason and tokens == len(ref.token_ids), i
    # ... and every 8th request run truly alone (sequential runs of all 64 cost ~30 s on 2 cores).
    for i in range(0, NUM_REQUESTS, 8):
        alone = llm.chat(conversation(i), params[i])[0].outputs[0]
        assert served[i][0] == alone.text, f"request {i}: served {served[i][0]!r} != alone {alone.text!r}"


def test_async_scheduling_server_serves_the_same_streams(start_server, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    """The same 64 streams through a server whose engine keeps a step in flight (as on a GPU)."""
    server = start_server("--max-num-seqs", "16", "--served-model-name", "tiny", "--async-scheduling")
    served = asyncio.run(stream_all(server))
    llm = LLM(model=str(tiny_model), device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=NUM_REQUESTS)
    params = [SamplingParams(max_tokens=max_tokens(i), temperature=0.0) for i in range(NUM_REQUESTS)]
    batched = llm.chat([conversation(i) for i in range(NUM_REQUESTS)], params)
    for i, (text, finish, tokens) in enumerate(served):
        ref = batched[i].outputs[0]
        assert (text, finish, tokens) == (ref.text, ref.finish_reason, len(ref.token_ids)), i
