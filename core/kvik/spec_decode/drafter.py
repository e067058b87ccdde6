"""Drafters: proposers that run a model on the runner (a draft model, an EAGLE head).

A drafter lives inside a torch model runner. After every step it brings its own KV
cache up to date with the tokens the target just computed (the accepted prefix of
a verify row, prefill chunks) plus the token the step sampled, then runs ``k - 1``
one-token steps to propose the next ``k`` tokens of each sampling request. The
drafts travel back to the engine in :attr:`RunnerOutput.draft_token_ids`, where
:class:`RunnerDraftProposer` hands them to the scheduler like any proposer's.

KV layout: the drafter's caches are indexed by the *target's* block ids (one block
pool, the draft layers' blocks allocated alongside), so the target's block tables,
prefix cache, preemption and rollback apply unchanged: position ``p`` of a request
lives in the same block id in both caches. Draft positions beyond the blocks the
target holds (the lookahead of ``k`` speculative tokens) go to per-row scratch blocks
after the pool (:func:`draft_tables`), which only ever hold guesses. Every position
the target has computed holds the draft's KV of the real token, because each step
the drafter recomputes exactly the target's known rows.

Draft tokens are greedy for greedy and seeded requests (a one-hot ``q``: the verifier's
default rule is exact, and seeds stay reproducible) and sampled at the request's
temperature otherwise; the distribution ``q`` each sampled draft came from is kept
until the verify step, which needs it for the ``min(1, p / q)`` rule.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from kvik.request import Request
from kvik.sample.sampler import argmax_rows
from kvik.sampling_params import SamplingParams
from kvik.scheduling.output import RunnerOutput, ScheduledRequest
from kvik.spec_decode.config import SpeculativeConfig
from kvik.spec_decode.proposer import Proposer
from kvik.tensor_transfer import to_device
from kvik.worker.kit.block_tables import BlockTables

if TYPE_CHECKING:
    from kvik.worker.kit.layout import StepLayout
    from kvik.worker.torch_runner import TorchModelRunner

_DRAFT_PARAMS = SamplingParams(temperature=0)  # what draft steps' ScheduledRequests carry (no logprobs)


class RunnerDraftProposer(Proposer):
    """The engine side of a drafter: it proposes what the runner drafted after the last step."""

    # "module:Class" of the :class:`Drafter` the runner builds for this method.
    drafter: ClassVar[str] = ""

    def __init__(self, config: SpeculativeConfig) -> None:
        super().__init__(config)
        self._drafts: dict[str, list[int]] = {}

    def step_finished(self, output: RunnerOutput) -> None:
        self._drafts = output.draft_token_ids or {}

    def propose(self, requests: list[Request], num_tokens: list[int]) -> list[list[int]]:
        return [self._drafts.get(r.request_id, [])[:k] for r, k in zip(requests, num_tokens, strict=True)]


class Drafter(ABC):
    """The runner side: owns the draft weights and KV cache, proposes after every step."""

    # True when the drafter reads the target's intermediate activations, which a CUDA graph
    # replay does not expose: the runner then runs the target eagerly.
    needs_eager_target: bool = False
    # True when :meth:`decode_pass` exists: a runner with CUDA graphs captures it per decode size.
    has_decode_pass: bool = False

    def __init__(self, config: SpeculativeConfig, runner: TorchModelRunner) -> None:
        self.config = config
        self.runner = runner
        self.k = config.num_speculative_tokens
        self.vocab_size = runner.model_config.vocab_size  # the target's: drafts and q use its ids
        self.generator = torch.Generator(device=runner.device)
        self.generator.manual_seed(runner.config.seed + 1)
        # The last proposal's sampled rows: request id -> (its drafts, q [k, vocab] on the device).
        self._probs: dict[str, tuple[list[int], torch.Tensor]] = {}

    # -- lifecycle (the runner calls these next to its own) -----------------------------
    @abstractmethod
    def load(self) -> None:
        """Load the draft weights; ValueError when they cannot draft for the target."""

    def weight_bytes(self) -> int:
        return 0

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes the drafter's KV adds to each block of the shared pool."""
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:  # noqa: B027 - optional
        """Allocate the draft KV for ``num_blocks`` pool blocks plus the scratch blocks."""

    def shutdown(self) -> None:  # noqa: B027 - optional
        """Release the draft's device memory."""

    @property
    def num_scratch_blocks(self) -> int:
        """Scratch blocks per request row: the lookahead past the target's table."""
        return -(-self.k // self.runner.block_size) + 1

    @abstractmethod
    def propose(self, layout: StepLayout, hidden: torch.Tensor, sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        """After a step: catch up on its known tokens, return each sampling request's ``k`` drafts.

        ``hidden`` [T, hidden] are the target's final hidden states of ``layout``'s rows;
        ``sampled`` the step's tokens per request (accepted drafts plus one)."""

    def decode_pass(
        self, input_ids: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, metadata: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft token per request row: (the draft's hidden states [T, H], float32 logits [T, vocab]).

        Contract for drafters that set ``has_decode_pass``: static shapes, no host synchronisation and
        no allocation that outlives the call, so a runner may capture it as a CUDA graph per decode
        size and replay it (``TorchModelRunner.run_draft_decode``); ``prev`` is the previous pass's
        hidden state per row (or the step's, for the first)."""
        raise NotImplementedError(f"{type(self).__name__} has no decode pass")

    # -- verify support -----------------------------------------------------------------
    def draft_probs(self, reqs: list[ScheduledRequest], counts: list[int], logits: torch.Tensor) -> torch.Tensor | None:
        """``q`` [R, vocab] for a verify step's rows (``counts[i]`` = drafts + 1 rows per request), or
        None when every draft in it was deterministic. Rows of deterministic drafts are one-hot."""
        probs, self._probs = self._probs, {}
        hits: list[tuple[int, torch.Tensor]] = []
        for i, r in enumerate(reqs):
            stored = probs.get(r.request_id)
            # Only drafts that are a prefix of what this drafter sampled were drawn from its q.
            if stored is not None and r.draft_token_ids and r.draft_token_ids == stored[0][: len(r.draft_token_ids)]:
                hits.append((i, stored[1]))
        if not hits:
            return None
        first = np.cumsum([0, *counts]).tolist()
        q_all = torch.zeros_like(logits)
        rows: list[int] = []
        ids: list[int] = []
        for r, count, start in zip(reqs, counts, first, strict=False):
            rows.extend(range(start, start + count - 1))
            ids.extend(r.draft_token_ids)
        if rows:
            index = to_device(torch.tensor([rows, ids], dtype=torch.int64), logits.device)
            q_all[index[0], index[1]] = 1.0
        for i, q in hits:
            n = len(reqs[i].draft_token_ids)
            q_all[first[i] : first[i] + n] = q[:n]
        return q_all

    # -- helpers for subclasses ---------------------------------------------------------
    def catch_up(
        self, layout: StepLayout, sampled: dict[str, list[int]]
    ) -> tuple[list[ScheduledRequest], list[int], list[SamplingParams], list[int]]:
        """The draft step that recomputes the target's known rows of ``layout`` plus each new token.

        Returns (the draft step's requests, for each its row in ``layout.scheduled``, the
        sampling requests' params, and for each its new token's position)."""
        steps: list[ScheduledRequest] = []
        owners: list[int] = []
        params: list[SamplingParams] = []
        positions: list[int] = []
        for i, req in enumerate(layout.scheduled):
            if req.pooling_params is not None:
                continue
            new = sampled.get(req.request_id) if req.sample else None
            if new:
                known = len(req.token_ids) - len(req.draft_token_ids) + len(new) - 1
                tokens = [*req.token_ids[:known], new[-1]]
                params.append(req.sampling_params)
                positions.append(req.start_pos + known)
            else:
                tokens = req.token_ids
            steps.append(ScheduledRequest(req.request_id, tokens, req.start_pos, [], bool(new), _DRAFT_PARAMS))
            owners.append(i)
        return steps, owners, params, positions

    def draft_tables(self, layout: StepLayout, owners: list[int], num_pool_blocks: int) -> BlockTables:
        """Block tables for the draft steps: each owner's blocks in ``layout``, then its scratch blocks."""
        n, bs, extra = len(owners), layout.block_size, self.num_scratch_blocks
        index = np.asarray(owners, dtype=np.int64)
        held = -(-layout.seq_lens[index].astype(np.int64) // bs)  # [n] blocks the target's rows cover
        cols = int(held.max()) + extra if n else extra
        tables = BlockTables(rows=n, cols=cols)
        width = min(cols, layout.block_table.shape[1])
        tables.table[:n, :width] = layout.block_table[index, :width]
        col = np.arange(cols)[None, :]
        scratch = num_pool_blocks + np.arange(n)[:, None] * extra + (col - held[:, None])
        past = col >= held[:, None]
        tables.table[:n] = np.where(past & (col < held[:, None] + extra), scratch, np.where(past, 0, tables.table[:n]))
        tables.num_blocks[:n] = held + extra
        return tables

    def pick(
        self, logits: torch.Tensor, params: list[SamplingParams]
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
        """Draft tokens [S] from draft logits [S, draft vocab]: argmax for greedy and seeded rows,
        sampled at the row's temperature otherwise. Also ``q`` [S, vocab] (None if no row sampled;
        only the sampled rows' are meaningful) and which rows sampled."""
        logits = self.to_target_vocab(logits.float())
        sampled = [not (p.greedy or p.seed is not None) for p in params]
        argmax = argmax_rows(logits)
        if not any(sampled):
            return argmax, None, sampled
        temps = [float(p.temperature) if s else 1.0 for p, s in zip(params, sampled, strict=True)]
        column = to_device(torch.tensor(temps, dtype=torch.float32), logits.device)[:, None]
        probs = (logits / column).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        tokens = argmax_rows(probs / noise)  # the exponential race: a sample from probs
        mask = to_device(torch.tensor(sampled, dtype=torch.bool), logits.device)
        return torch.where(mask, tokens, argmax), probs, sampled

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits cut or padded (with -inf) to the target's vocabulary size."""
        v = logits.shape[-1]
        if v == self.vocab_size:
            return logits
        if v > self.vocab_size:
            return logits[..., : self.vocab_size]
        pad = logits.new_full((*logits.shape[:-1], self.vocab_size - v), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def remember(
        self, request_ids: list[str], tokens: list[list[int]], probs: list[torch.Tensor | None], sampled: list[bool]
    ) -> None:
        """Keep the sampled rows' ``q`` ([k, vocab] per request, one [S, vocab] per draft position
        in ``probs``) for the next verify step."""
        self._probs = {}
        if not any(sampled) or any(p is None for p in probs):
            return
        stacked = torch.stack([p for p in probs if p is not None], dim=1)  # [S, k, vocab]
        for i, rid in enumerate(request_ids):
            if sampled[i]:
                self._probs[rid] = (tokens[i], stacked[i])

    def run_drafts(
        self,
        first_logits: torch.Tensor,
        params: list[SamplingParams],
        step: Callable[[torch.Tensor, int], torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], list[bool]]:
        """Draft ``k`` tokens per sampling request: the first from ``first_logits`` [S, vocab], each
        next one from ``step(previous tokens [S], j)`` (the logits after feeding draft ``j``).
        Returns the drafts [S, k] on the device, ``q`` per draft position and which rows sampled."""
        tokens, q, sampled = self.pick(first_logits, params)
        drafts, probs = [tokens], [q]
        for j in range(1, self.k):
            tokens, q, _ = self.pick(step(tokens, j), params)
            drafts.append(tokens)
            probs.append(q)
        return torch.stack(drafts, dim=1), probs, sampled


def make_drafter(runner: TorchModelRunner) -> Drafter | None:
    """The drafter the configured method's proposer names (None: a host-side method, or no speculation)."""
    spec = runner.config.speculative_config
    if spec is None:
        return None
    path = getattr(runner.manager.spec_proposers.get(spec.method), "drafter", "")
    if not path:
        return None
    module, _, name = path.partition(":")
    drafter_cls = getattr(importlib.import_module(module), name)
    drafter: Drafter = drafter_cls(spec, runner)
    return drafter
