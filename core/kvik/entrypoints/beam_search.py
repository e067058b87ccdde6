"""Beam search over the engine, with vLLM's ``LLM.beam_search`` semantics.

Each step asks the engine for one token of every live beam with its top
``2 * beam_width`` raw log-probabilities (the prefix cache makes re-sending a
beam's tokens cheap), extends each beam by each candidate, moves candidates
ending in EOS to the finished list (unless ``ignore_eos``), and keeps the
``beam_width`` extensions with the highest cumulative log-probability. At the
end, finished and live beams are ranked together by
``cumulative_logprob / len(tokens) ** length_penalty`` (``len(tokens)`` counts
the prompt, and a final EOS is not counted) and the best ``beam_width`` returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvik.outputs import Logprob, RequestOutput
from kvik.sampling_params import BeamSearchParams, SamplingParams


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's followed by the generated ones (as in vLLM)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # one dict per generated token
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass(slots=True)
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_token_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's ranking of finished beams: log-probability per token to the power ``length_penalty``."""
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (max(length, 1) ** length_penalty)


@dataclass(slots=True)
class _Search:
    prompt_len: int
    beams: list[BeamSearchSequence]
    finished: list[BeamSearchSequence] = field(default_factory=list)


# Runs token-id prompts with SamplingParams and returns their outputs in order (LLM.generate).
Generate = Callable[[list[list[int]], SamplingParams], list[RequestOutput]]


def beam_search(
    generate: Generate,
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: frozenset[int],
    max_model_len: int,
    decode: Callable[[list[int]], str] | None = None,
) -> list[BeamSearchOutput]:
    """Beam-search every prompt (token ids); one output per prompt, in order."""
    width = params.beam_width
    step_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True, detokenize=False)
    eos = frozenset() if params.ignore_eos else eos_token_ids
    searches = [_Search(len(p), [BeamSearchSequence(tokens=list(p))]) for p in prompts]
    for _ in range(params.max_tokens):
        live = [(s, b) for s in searches for b in s.beams if len(b.tokens) < max_model_len]
        for s in searches:  # a beam that fills the context cannot grow: it is done
            s.finished.extend(_done(b, "length") for b in s.beams if len(b.tokens) >= max_model_len)
            s.beams = []
        if not live:
            break
        outputs = generate([b.tokens for _, b in live], step_params)
        extended: dict[int, list[BeamSearchSequence]] = {}
        for (search, beam), output in zip(live, outputs, strict=True):
            candidates = (output.outputs[0].logprobs or [{}])[0]
            for token, lp in candidates.items():
                child = BeamSearchSequence(
                    tokens=[*beam.tokens, token],
                    logprobs=[*beam.logprobs, candidates],
                    cum_logprob=beam.cum_logprob + lp.logprob,
                )
                if token in eos:
                    search.finished.append(_done(child, "stop", token))
                else:
                    extended.setdefault(id(search), []).append(child)
        for search in searches:
            children = extended.get(id(search), [])
            children.sort(key=lambda b: b.cum_logprob, reverse=True)
            search.beams = children[:width]
    results = []
    for search in searches:
        pool = search.finished + [_done(b, "length") for b in search.beams]
        pool.sort(key=lambda b: beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty), reverse=True)
        best = pool[:width]
        if decode is not None:
            for beam in best:
                beam.text = decode(beam.tokens)
        results.append(BeamSearchOutput(best))
    return results


def _done(beam: BeamSearchSequence, reason: str, stop: int | None = None) -> BeamSearchSequence:
    beam.finish_reason, beam.stop_reason = reason, stop
    return beam


def as_token_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """A parsed prompt (text or ids) as token ids."""
    return list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
