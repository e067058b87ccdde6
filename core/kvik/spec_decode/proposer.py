"""The proposer interface: a method that guesses each request's next tokens on the host.

Proposers are registered by name through the ``kvik_register_spec_proposers`` plugin
hook (``register("ngram", "kvik.spec_decode.ngram:NgramProposer")``) and picked with
``speculative_config={"method": name, ...}``. The engine calls :meth:`Proposer.propose`
once per step for the running requests that are decoding, after the step's tokens were
appended; a proposal may be shorter than asked (or empty: that request decodes one token).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvik.request import Request
from kvik.scheduling.output import RunnerOutput
from kvik.spec_decode.config import SpeculativeConfig


class Proposer(ABC):
    """Guesses draft tokens. Draft tokens cost a verify position each, so propose only likely ones."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    @abstractmethod
    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        """For each request (its ``all_token_ids`` are prompt + outputs so far), at most
        ``num_tokens[i]`` draft tokens that would follow them."""

    def step_finished(self, output: RunnerOutput) -> None:  # noqa: B027 - optional
        """A step's results arrived (before the next ``propose``): proposers whose drafts the runner
        computes (:class:`kvik.spec_decode.drafter.RunnerDraftProposer`) read them here."""

    def request_finished(self, request: Request) -> None:  # noqa: B027 - optional
        """A request ended (its tokens are final): proposers that learn across requests keep them."""
