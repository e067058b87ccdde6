"""A test plugin: a proposer that replays a known greedy continuation, corrupting some drafts.

It gives known acceptance on random-weight models (whose n-gram acceptance is near
zero) and exercises the ``kvik_register_spec_proposers`` hook as a third party would.
"""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl
from kvik.request import Request
from kvik.spec_decode.proposer import Proposer

KVIK_PLUGIN_API = ">=2.2,<3"

# prompt token ids -> the greedy output of a run without speculation (filled by the test)
CONTINUATIONS: dict[tuple[int, ...], list[int]] = {}


class ReplayProposer(Proposer):
    """Drafts the true next tokens; at every third output position the last draft is wrong."""

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        drafts = []
        for request, k in zip(requests, num_tokens, strict=True):
            truth = CONTINUATIONS.get(tuple(request.prompt_token_ids), [])
            pos = request.num_output_tokens
            guess = list(truth[pos : pos + k]) or [5] * k  # past the known end: a plain guess
            if pos % 3 == 0 and guess:
                guess[-1] = (guess[-1] + 1) % 400
            drafts.append(guess[:k])
        return drafts


# ScriptedProposer: drafts the true continuation only for output positions below this
DRAFT_BELOW = [0]
ASKED: list[int] = []  # the output positions ScriptedProposer was asked to draft at


class ScriptedProposer(Proposer):
    """Drafts the true next tokens for outputs shorter than ``DRAFT_BELOW[0]``, nothing after;
    records every position it is asked at."""

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        drafts = []
        for request, k in zip(requests, num_tokens, strict=True):
            pos = request.num_output_tokens
            ASKED.append(pos)
            truth = CONTINUATIONS.get(tuple(request.prompt_token_ids), [])
            drafts.append(list(truth[pos : pos + k]) if pos < DRAFT_BELOW[0] else [])
        return drafts


@hookimpl
def kvik_register_spec_proposers(register: RegisterFn) -> None:
    register("replay", f"{__name__}:ReplayProposer")
    register("scripted", f"{__name__}:ScriptedProposer")
