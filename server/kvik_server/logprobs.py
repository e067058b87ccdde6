"""Engine logprobs (``[{token_id: Logprob}]`` per output position, chosen token first) → OpenAI's shapes."""

from __future__ import annotations

from typing import Any

from kvik.outputs import Logprob

# JSON has no -Infinity; a token the sampler ruled out (top-k, grammar) would otherwise break the body.
_FLOOR = -9999.0


def _value(logprob: Logprob) -> float:
    return max(float(logprob.logprob), _FLOOR)


def _text(logprob: Logprob) -> str:
    return logprob.decoded_token or ""


def _top(position: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted(position.values(), key=lambda lp: -lp.logprob)[:k]


def chat_logprobs(positions: list[dict[int, Logprob]], top: int) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` entries: token, logprob, bytes, top_logprobs (``top`` of them)."""
    entries = []
    for position in positions:
        chosen = next(iter(position.values()))
        entries.append(
            {
                "token": _text(chosen),
                "logprob": _value(chosen),
                "bytes": list(_text(chosen).encode()),
                "top_logprobs": [
                    {"token": _text(lp), "logprob": _value(lp), "bytes": list(_text(lp).encode())}
                    for lp in _top(position, top)
                ],
            }
        )
    return entries


def completion_logprobs(positions: list[dict[int, Logprob]], top: int, text_offset: int) -> dict[str, Any]:
    """Completions' ``logprobs``: parallel lists; ``text_offset`` is where the first token starts."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    for position in positions:
        chosen = next(iter(position.values()))
        tokens.append(_text(chosen))
        token_logprobs.append(_value(chosen))
        top_logprobs.append({_text(lp): _value(lp) for lp in _top(position, top)})
        offsets.append(text_offset)
        text_offset += len(_text(chosen))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def prompt_logprobs_json(positions: list[dict[int, Logprob] | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token ``{token_id: {logprob, rank, decoded_token}}``, first None."""
    if positions is None:
        return None
    return [
        None
        if position is None
        else {
            str(token): {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token, lp in position.items()
        }
        for position in positions
    ]
