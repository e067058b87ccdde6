"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p.

The sampler is a pipeline of steps over the whole batch (``[n, vocab]``
float32 logits), each a plain function of the logits and the batch's per-row
parameters. Logits processors (penalties, logit bias, allowed tokens) plug in
ahead of the temperature step through :attr:`Sampler.logits_processors`.

Random choices use the exponential race: ``argmax(probs / E)`` with
``E ~ Exponential(1)`` i.i.d. per token picks token ``i`` with probability
``probs[i]``. A seeded row draws ``E`` from a generator seeded by
``(seed, output position)``, so its token depends only on its own logits, seed
and position: not on the batch it ran in, nor on how many steps ran before
(a preempted and recomputed request samples the same tokens again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

import torch

from kvik.sample.batch import SamplingBatch, row_seed
from kvik.sample.logits_processors import DEFAULT_LOGITS_PROCESSORS
from kvik.tensor_transfer import to_device

# SamplingBatch and row_seed are torch-free (kvik.sample.batch); importable from here too.
__all__ = ["LogitsProcessor", "Sampler", "SamplingBatch", "apply_min_p", "apply_top_k_top_p", "row_seed"]


# (logits [n, vocab] float32, batch) -> logits; may modify in place.
LogitsProcessor = Callable[[torch.Tensor, SamplingBatch], torch.Tensor]


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a 2-D ``x``: the first maximum of each row, NaN counting as the maximum.

    On the CPU numpy finds the same index (its tie and NaN rules are torch's) 8-10x faster than torch's
    reduction: over a 49,152-wide vocabulary, 6 against 48 us for one row and 0.15 against 1.4 ms for 32
    on two cores, the greedy step's largest host cost at batch 1.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(x.numpy().argmax(axis=-1).astype("int64", copy=False))
    return x.argmax(dim=-1)


class Sampler:
    """Samples one token per row. Unseeded rows share one generator seeded from ``seed``."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        seed: int = 0,
        top_p_candidates: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.device = torch.device(device)
        # Deterministic mode: a row's nucleus must not depend on its neighbours. The candidate
        # shortcut falls back to bisection for the whole batch when one row needs it (the two
        # round the nucleus mass differently), and tied logits must keep their token-id order.
        self.batch_invariant = batch_invariant
        if batch_invariant:
            top_p_candidates = 0
        # Top-p over the best N logits avoids sorting the vocabulary each step; checking
        # that N sufficed costs a host sync, free on the CPU (where sorting is slow), a
        # stall on accelerators (where sorting is fast): so on by default for CPU only.
        self.top_p_candidates = (
            (256 if self.device.type == "cpu" else 0) if top_p_candidates is None else top_p_candidates
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.logits_processors: list[LogitsProcessor] = list(DEFAULT_LOGITS_PROCESSORS)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [n, vocab] float32 -> sampled token ids [n] int64 (on the logits' device)."""
        for processor in self.logits_processors:
            logits = processor(logits, batch)
        if all(p.greedy for p in batch.distinct_params):
            return argmax_rows(logits)
        greedy = [p.greedy for p in batch.params]
        temps = [1.0 if g else float(p.temperature) for p, g in zip(batch.params, greedy, strict=True)]
        logits = logits / self._column(temps, logits)
        logits = apply_top_k_top_p(logits, batch, self._column, self.top_p_candidates, self.batch_invariant)
        logits = apply_min_p(logits, batch, self._column)
        probs = logits.softmax(dim=-1)
        sampled = argmax_rows(probs.div_(self._noise(probs.shape, batch)))
        if any(greedy):
            greedy_ids = argmax_rows(logits)  # temperature 1 there, and filters keep the max
            sampled = torch.where(self._column(greedy, logits, torch.bool).squeeze(1), greedy_ids, sampled)
        return sampled

    def verify(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        draft_ids: list[int],
        draft_probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative decoding's exact rejection rule, one row per scored position.

        ``draft_ids[i]`` is the drafted token at row ``i`` (-1: none, a bonus row). With
        ``p`` the row's target distribution (every knob applied) and ``q`` the
        distribution the draft was drawn from, the draft is accepted with probability
        ``min(1, p(d) / q(d))``; otherwise the token comes from the residual
        ``max(0, p - q)`` (normalised). ``draft_probs`` [n, vocab] float32 gives ``q``
        per row (a row of a deterministic draft is one-hot at ``d``); None means every
        draft is deterministic, so acceptance is ``p(d)`` and the residual is ``p``
        without ``d``. Greedy rows accept a draft equal to the argmax. Returns
        (accepted [n] bool, sampled [n] int64: the residual (or argmax) sample).
        """
        for processor in self.logits_processors:
            logits = processor(logits, batch)
        drafts = to_device(torch.tensor(draft_ids, dtype=torch.int64), logits.device)
        has_draft = drafts >= 0
        greedy = [p.greedy for p in batch.params]
        argmax = argmax_rows(logits)
        if all(greedy):
            return has_draft & (argmax == drafts), argmax
        temps = [1.0 if g else float(p.temperature) for p, g in zip(batch.params, greedy, strict=True)]
        logits = logits / self._column(temps, logits)
        logits = apply_top_k_top_p(logits, batch, self._column, self.top_p_candidates, self.batch_invariant)
        logits = apply_min_p(logits, batch, self._column)
        probs = logits.softmax(dim=-1)
        index = drafts.clamp(min=0)[:, None]
        p_draft = probs.gather(1, index).squeeze(1)
        noise, uniform = self._noise(probs.shape, batch, with_uniform=True)
        if draft_probs is None:
            accepted = has_draft & (uniform < p_draft)
            residual = torch.where(has_draft[:, None], probs.scatter(1, index, 0.0), probs)
        else:
            q_draft = draft_probs.gather(1, index).squeeze(1)
            accepted = has_draft & (uniform * q_draft < p_draft)  # u < p(d) / q(d), no division by 0
            residual = torch.where(has_draft[:, None], (probs - draft_probs).clamp_(min=0.0), probs)
            # p == q up to rounding leaves no residual mass: such a row accepts with probability ~1,
            # and a rounding-level rejection samples from p (never from an all-zero row).
            empty = residual.sum(dim=-1, keepdim=True) <= 0
            residual = torch.where(empty, probs, residual)
        sampled = argmax_rows(residual.div_(noise))
        if any(greedy):
            g = self._column(greedy, logits, torch.bool).squeeze(1)
            accepted = torch.where(g, has_draft & (argmax == drafts), accepted)
            sampled = torch.where(g, argmax, sampled)
        return accepted, sampled

    def _column(self, values: list, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A per-row list as an [n, 1] tensor on ``like``'s device (one host->device copy)."""
        return to_device(torch.tensor(values, dtype=dtype), like.device)[:, None]

    @overload
    def _noise(self, shape: torch.Size, batch: SamplingBatch) -> torch.Tensor: ...
    @overload
    def _noise(
        self, shape: torch.Size, batch: SamplingBatch, with_uniform: bool
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def _noise(
        self, shape: torch.Size, batch: SamplingBatch, with_uniform: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exponential(1) noise [n, vocab]: seeded rows from their own (seed, position) generator.

        ``with_uniform`` also returns one Uniform[0, 1) per row (speculative acceptance),
        drawn after the row's noise from the same generator."""
        noise = torch.empty(shape, dtype=torch.float32, device=self.device)
        noise.uniform_(generator=self.generator)
        uniform = torch.empty(shape[0], dtype=torch.float32, device=self.device)
        if with_uniform:
            uniform.uniform_(generator=self.generator)
        for row, (params, position) in enumerate(zip(batch.params, batch.output_positions, strict=True)):
            if params.seed is None or params.greedy:
                continue
            gen = torch.Generator(device=self.device)
            gen.manual_seed(row_seed(params.seed, position))
            noise[row].uniform_(generator=gen)
            if with_uniform:
                uniform[row : row + 1].uniform_(generator=gen)
        # -log(U) for U ~ Uniform[0, 1) is Exponential(1); 4x faster than exponential_()
        # on CPUs. U = 0 gives +inf, so that token loses the race (probability 2**-24).
        noise = noise.log_().neg_()
        return (noise, uniform) if with_uniform else noise


def apply_top_k_top_p(
    logits: torch.Tensor,
    batch: SamplingBatch,
    column: Callable[..., torch.Tensor],
    candidates: int = 0,
    stable: bool = False,
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus.

    top-p keeps the smallest set of highest-probability tokens whose mass
    reaches ``top_p`` (always at least the most likely token; tokens tied
    with the last one kept may be kept too).

    ``candidates`` = 0 sorts each row (fast on accelerators). ``candidates``
    > 0 avoids the vocabulary sort, which is slow on CPUs: the nucleus is
    computed over each row's ``candidates`` best logits when that provably
    holds it (checking costs one host sync), else by bisecting the threshold.
    ``stable``: sort tied logits in token-id order (deterministic mode).
    """
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in batch.params]
    # Rows without top-p get a threshold no cumulative sum can reach, even with rounding.
    top_p = [float(p.top_p) if p.top_p < 1.0 else 2.0 for p in batch.params]
    use_k = any(k < vocab for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not use_k and not use_p:
        return logits
    if not use_p:
        # Cheaper than a full sort: keep logits >= each row's k-th largest.
        k_col = column(top_k, logits, torch.int64)
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, k_col - 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    if 0 < candidates < vocab:
        if all(k <= candidates or k == vocab for k in top_k):
            filtered = _top_k_top_p_candidates(logits, top_k, top_p, column, candidates)
            if filtered is not None:
                return filtered
        return _top_k_top_p_bisect(logits, top_k, top_p, column)
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=stable)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    if use_k:
        sorted_logits = sorted_logits.masked_fill(ranks >= column(top_k, logits, torch.int64), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop = (mass_before >= column(top_p, logits)) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _top_k_top_p_bisect(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], column: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """The nucleus as ``probs >= t`` with ``t`` the largest threshold keeping mass >= top_p.

    Positive float32 values order like their int32 bit patterns, so 31 halvings
    of the bit range find ``t`` exactly: 31 vectorised passes instead of a sort.
    """
    vocab = logits.shape[-1]
    if any(k < vocab for k in top_k):
        k_col = column(top_k, logits, torch.int64)
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, k_col - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    p_col = column(top_p, logits)
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    lo = torch.zeros_like(p_col, dtype=torch.int32)  # mass(probs >= 0) = 1 >= top_p
    hi = probs.amax(dim=-1, keepdim=True).view(torch.int32) + 1  # mass(probs >= above max) = 0 < top_p
    for _ in range(31):
        mid = (lo + hi) // 2
        ok = torch.where(probs >= mid.view(torch.float32), probs, zero).sum(dim=-1, keepdim=True) >= p_col
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return logits.masked_fill(probs < lo.view(torch.float32), float("-inf"))


def _top_k_top_p_candidates(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], column: Callable[..., torch.Tensor], candidates: int
) -> torch.Tensor | None:
    """The same result as the sort path, from the ``candidates`` best logits; None when they may not suffice."""
    vocab = logits.shape[-1]
    values, index = logits.topk(candidates, dim=-1)  # [n, c], descending
    ranks = torch.arange(candidates, device=logits.device)[None, :]
    k_col = column(top_k, logits, torch.int64)
    values = values.masked_fill(ranks >= k_col, float("-inf"))
    # A candidate's probability: over the row's top-k when it has one (all of
    # it is among the candidates), else over the whole vocabulary.
    has_k = k_col < vocab
    norm = torch.where(has_k, values.logsumexp(-1, keepdim=True), logits.logsumexp(-1, keepdim=True))
    probs = (values - norm).exp()
    p_col = column(top_p, logits)
    drop = ((probs.cumsum(dim=-1) - probs) >= p_col) & (ranks > 0)
    # Exact iff every row's nucleus closed inside the candidates (or top-k bounded it),
    # or the row filters nothing at all (kept whole below).
    untouched = ~has_k & (p_col > 1.0)
    if not bool((drop.any(dim=-1, keepdim=True) | has_k | untouched).all()):
        return None
    kept = torch.full_like(logits, float("-inf")).scatter_(1, index, values.masked_fill(drop, float("-inf")))
    return torch.where(untouched, logits, kept)


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch, column: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability."""
    min_p = [float(p.min_p) for p in batch.params]
    if not any(m > 0 for m in min_p):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * column(min_p, logits)
    return logits.masked_fill(probs < threshold, float("-inf"))
