"""Sampling in MLX with the torch sampler's semantics (kvik.sample.sampler).

Imports no torch: the batch description is the runner kit's (kvik.sample.batch).

Per row, in order: logits processors (structured-output bitmask, allowed
tokens, bad words, logit bias, min_tokens, repetition / frequency / presence
penalties; vLLM V1's order, as in kvik.sample.logits_processors), then greedy argmax or
temperature → top-k → top-p → min-p → exponential race ``argmax(probs / E)``.

Randomness: unseeded rows share one MLX key stream seeded from the engine
seed; a seeded row draws its noise from ``mx.random.key(row_seed(seed,
output position))``, so its token depends only on its own logits, seed and
position, never on the batch it ran in. (The noise differs from torch's:
same distribution, different generator.)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from kvik.sample.batch import SamplingBatch, row_seed
from kvik.sampling_params import SamplingParams

_TINY = float(np.finfo(np.float32).tiny)


def _needs_processing(params: SamplingParams, num_output: int) -> bool:
    return bool(
        params.allowed_token_ids
        or params.bad_words_token_ids
        or params.logit_bias
        or num_output < params.min_tokens
        or params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
        or params.logits_processors
    )


def _process_row(
    row: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int], eos: frozenset[int]
) -> np.ndarray:
    """One row's logits processors in numpy, in vLLM V1's order (rows needing them are rare)."""
    vocab = row.shape[0]
    if params.allowed_token_ids:
        keep = np.full(vocab, -np.inf, dtype=row.dtype)
        keep[[t for t in params.allowed_token_ids if 0 <= t < vocab]] = 0.0
        row += keep
    for word in params.bad_words_token_ids or []:
        # The word's last token is banned where the output ends with the rest of it.
        prefix = len(word) - 1
        if prefix == 0 or (len(output) >= prefix and list(output[-prefix:]) == list(word[:-1])):
            row[word[-1]] = -np.inf
    for token, bias in (params.logit_bias or {}).items():
        row[int(token)] += bias
    if len(output) < params.min_tokens:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        row[[t for t in stops if t < vocab]] = -np.inf
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray(list(prompt) + list(output), dtype=np.int64))
        vals = row[seen]
        row[seen] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output:
        counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=vocab)[:vocab].astype(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.logits_processors:  # vLLM's per-request callables take torch tensors
        import torch
        from kvik.sample.logits_processors import call_request_processors

        row = call_request_processors(params.logits_processors, list(prompt), list(output), torch.from_numpy(row))
        row = row.detach().cpu().numpy().astype(np.float32, copy=False)
    return row


def _unpack_bitmask(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """[m, ceil(vocab / 32)] int32 (bit t % 32 of word t // 32: token t allowed) -> [m, vocab] bool."""
    words = np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint32)
    bits = ((words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool).reshape(len(words), -1)
    allowed = np.zeros((len(words), vocab), dtype=bool)
    width = min(vocab, bits.shape[1])  # ids past the tokenizer's vocabulary are never allowed
    allowed[:, :width] = bits[:, :width]
    return allowed


def apply_logits_processors(logits: mx.array, batch: SamplingBatch) -> mx.array:
    """Structured-output bitmask, then each row's SamplingParams processors (see kvik.sample.logits_processors)."""
    structured = batch.bitmask is not None and bool(batch.bitmask_rows)
    rows = [i for i, p in enumerate(batch.params) if _needs_processing(p, batch.output_positions[i])]
    if not rows and not structured:
        return logits
    host = np.array(logits)  # [n, vocab] float32 copy
    if structured:
        assert batch.bitmask is not None
        allowed = _unpack_bitmask(batch.bitmask(), host.shape[1])
        host[batch.bitmask_rows] = np.where(allowed, host[batch.bitmask_rows], -np.inf)
    for i in rows:
        prompt = batch.prompt_token_ids[i] if batch.prompt_token_ids else []
        output = batch.output_token_ids[i] if batch.output_token_ids else []
        host[i] = _process_row(host[i], batch.params[i], prompt, output, batch.eos_token_ids)
    return mx.array(host)


def _column(values: list[float] | list[int], dtype: mx.Dtype = mx.float32) -> mx.array:
    return mx.array(values, dtype=dtype)[:, None]


def apply_top_k_top_p(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Mask tokens outside each row's top-k, then outside its top-p nucleus (at least the top token stays)."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [float(p.top_p) if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: unreachable threshold
    if all(k == vocab for k in top_k) and all(p > 1.0 for p in top_p):
        return logits
    order = mx.argsort(-logits, axis=-1)  # [n, vocab] descending
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    ranks = mx.arange(vocab)[None, :]
    sorted_logits = mx.where(ranks >= _column(top_k, mx.int32), -mx.inf, sorted_logits)
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    drop = (mass_before >= _column(top_p)) & (ranks > 0)
    sorted_logits = mx.where(drop, -mx.inf, sorted_logits)
    return mx.put_along_axis(mx.zeros_like(logits), order, sorted_logits, axis=-1)


def apply_min_p(logits: mx.array, params: list[SamplingParams]) -> mx.array:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability."""
    min_p = [float(p.min_p) for p in params]
    if not any(m > 0 for m in min_p):
        return logits
    probs = mx.softmax(logits, axis=-1)
    threshold = mx.max(probs, axis=-1, keepdims=True) * _column(min_p)
    return mx.where(probs < threshold, -mx.inf, logits)


class MLXSampler:
    """Samples one token per row from [n, vocab] float32 logits."""

    def __init__(self, seed: int = 0) -> None:
        self._key = mx.random.key(seed)

    def __call__(self, logits: mx.array, batch: SamplingBatch) -> mx.array:
        """-> sampled token ids [n] (lazy; the runner evaluates it with the step)."""
        logits = apply_logits_processors(logits, batch)
        greedy = [p.greedy for p in batch.params]
        if all(greedy):
            return mx.argmax(logits, axis=-1)
        temps = [1.0 if g else float(p.temperature) for p, g in zip(batch.params, greedy, strict=True)]
        logits = logits / _column(temps)
        logits = apply_top_k_top_p(logits, batch.params)
        logits = apply_min_p(logits, batch.params)
        probs = mx.softmax(logits, axis=-1)
        sampled = mx.argmax(probs / self._noise(probs.shape, batch), axis=-1)
        if any(greedy):  # temperature 1 there, and the filters keep the max
            sampled = mx.where(mx.array(greedy), mx.argmax(logits, axis=-1), sampled)
        return sampled

    def _noise(self, shape: tuple[int, ...], batch: SamplingBatch) -> mx.array:
        """Exponential(1) noise [n, vocab]; seeded rows from their own (seed, position) key."""
        self._key, step_key = mx.random.split(self._key)
        uniform = mx.random.uniform(shape=shape, key=step_key)
        seeded = [i for i, p in enumerate(batch.params) if p.seed is not None and not p.greedy]
        if seeded:
            rows = [uniform[i] for i in range(shape[0])]
            for i in seeded:
                key = mx.random.key(row_seed(batch.params[i].seed or 0, batch.output_positions[i]))
                rows[i] = mx.random.uniform(shape=shape[1:], key=key)
            uniform = mx.stack(rows)
        return mx.maximum(-mx.log(uniform), _TINY)  # E = -log U; keep the division finite
