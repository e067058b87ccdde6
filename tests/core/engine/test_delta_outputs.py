"""output_kind="delta": each output holds only what is new since the request's last one, and the deltas
add up (RequestOutput.add) to exactly the cumulative outputs, through the engine, AsyncLLM on a thread and
AsyncLLM over an engine process."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from kvik import LLM, SamplingParams
from kvik.engine.async_llm import AsyncLLM
from kvik.outputs import RequestOutput
from kvik.testing.reference import random_prompts

ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _run(path: str, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[RequestOutput]]:
    """Every output of every request, in order, stepping the engine directly."""
    engine = LLM(path, **ENGINE).llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    seen: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def _folded(outputs: list[RequestOutput]) -> RequestOutput:
    first, *rest = outputs
    for out in rest:
        first.add(out)
    return first


def _view(out: RequestOutput) -> tuple:
    completions = sorted(
        (c.index, c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)
        for c in out.outputs
    )
    return (completions, out.prompt_logprobs, out.finished)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(n=2, seed=3, temperature=1.0, logprobs=2, prompt_logprobs=1),
        dict(temperature=0.0, logprobs=0),
        dict(n=3, seed=9, temperature=0.8, top_p=0.9),
    ],
    ids=["n2-logprobs", "greedy", "n3"],
)
def test_deltas_add_up_to_the_cumulative_outputs(model_path, knobs) -> None:
    prompts = random_prompts(3, seed=31)
    base = dict(max_tokens=10, ignore_eos=True, **knobs)
    cumulative = _run(model_path, prompts, SamplingParams(**base))
    delta = _run(model_path, prompts, SamplingParams(output_kind="delta", **base))
    assert set(delta) == set(cumulative)
    for rid, outs in delta.items():
        n = base.get("n", 1)
        # Each delta holds only new tokens: over the stream, every sample's tokens arrive exactly once.
        sent = {i: 0 for i in range(n)}
        for out in outs:
            assert out.outputs, "a delta output with nothing in it"
            for c in out.outputs:
                sent[c.index] += len(c.token_ids)
        assert sent == {i: 10 for i in range(n)}
        assert sum(out.finished for out in outs) == 1 and outs[-1].finished
        assert _view(_folded(outs)) == _view(cumulative[rid][-1])


def test_deltas_with_a_stop_string_add_up_too(model_path) -> None:
    prompt = random_prompts(1, seed=32)[0]
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    text = _run(model_path, [prompt], SamplingParams(**greedy))["r0"][-1].outputs[0].text
    # Three ASCII letters from the middle of the text (the tiny tokenizer's text is mostly symbols): the stop
    # ends it early, after partial matches of its first letters were held back.
    start = next(i for i in range(len(text) // 3, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].isalpha())
    stop = text[start : start + 3]
    cumulative = _run(model_path, [prompt], SamplingParams(stop=[stop], **greedy))["r0"]
    delta = _run(model_path, [prompt], SamplingParams(stop=[stop], output_kind="delta", **greedy))["r0"]
    final = cumulative[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert _view(_folded(delta)) == _view(cumulative[-1])


def test_add_merges_a_backlog_in_place() -> None:
    from kvik.outputs import CompletionOutput

    def out(index: int, text: str, ids: list[int], finish: str | None) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(index, text, ids, finish_reason=finish)], finish is not None)

    merged = out(0, "a", [1], None)
    merged.add(out(1, "x", [7], None))  # another sample's first delta
    merged.add(out(0, "b", [2], "length"))
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == [
        (0, "ab", [1, 2], "length"),
        (1, "x", [7], None),
    ]
    assert merged.finished


@pytest.mark.parametrize("engine_process", [False, True], ids=["thread", "process"])
def test_async_delta_streams_add_up_to_the_offline_outputs(model_path, engine_process) -> None:
    prompts = random_prompts(4, seed=33)
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    offline = LLM(model_path, **ENGINE).generate(prompts, SamplingParams(**greedy))

    async def main() -> list[tuple[str, list[int]]]:
        engine = AsyncLLM.from_engine_args(model=model_path, engine_process=engine_process, **ENGINE)

        async def one(i: int, prompt: list[int]) -> tuple[str, list[int]]:
            text, ids = "", []
            async for out in engine.generate(prompt, SamplingParams(output_kind="delta", **greedy), request_id=f"r{i}"):
                for c in out.outputs:
                    text += c.text
                    ids += c.token_ids
            return text, ids

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()

    streamed = asyncio.run(main())
    assert streamed == [(o.outputs[0].text, o.outputs[0].token_ids) for o in offline]


def test_cumulative_streams_over_an_engine_process_cross_as_deltas(model_path, monkeypatch) -> None:
    """An engine process sends a cumulative stream's steps as deltas and the caller folds them back: every
    output equals what the engine on a thread streams (n = 2, logprobs, prompt logprobs)."""
    from kvik.engine import engine_process

    crossed: list[str] = []
    send = engine_process.EngineProcess.send

    def spy(self, kind, payload):  # type: ignore[no-untyped-def]
        if kind == "add":
            crossed.append(payload.params.output_kind)
        return send(self, kind, payload)

    monkeypatch.setattr(engine_process.EngineProcess, "send", spy)
    prompts = random_prompts(3, seed=34)
    params = SamplingParams(n=2, seed=4, temperature=1.0, max_tokens=9, ignore_eos=True, logprobs=1, prompt_logprobs=1)

    async def stream(place: bool) -> list[tuple]:
        engine = AsyncLLM.from_engine_args(model=model_path, engine_process=place, **ENGINE)

        async def one(i: int, prompt: list[int]) -> tuple:
            outs = [out async for out in engine.generate(prompt, params, request_id=f"r{i}")]
            last = outs[-1]
            # Every output is cumulative: each sample's tokens only grow.
            for before, after in itertools.pairwise(outs):
                for b, a in zip(before.outputs, after.outputs, strict=True):
                    assert a.token_ids[: len(b.token_ids)] == b.token_ids and a.text.startswith(b.text)
            return _view(last)

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()

    on_thread = asyncio.run(stream(False))
    in_process = asyncio.run(stream(True))
    assert crossed == ["delta"] * len(prompts)
    for mine, ref in zip(in_process, on_thread, strict=True):
        (completions, prompt_logprobs, finished), (ref_completions, ref_prompt_logprobs, ref_finished) = mine, ref
        assert finished and ref_finished
        assert [c[:3] + c[5:] for c in completions] == [c[:3] + c[5:] for c in ref_completions]  # text, ids, finish
        assert len(prompt_logprobs) == len(ref_prompt_logprobs)
