"""Batched logits processors: the SamplingParams knobs that edit logits before temperature.

Each processor is ``(logits [n, vocab] float32, batch) -> logits`` over the
whole batch: it picks the rows that use its knob (a Python pass over the
requests, never over the vocabulary), builds that step's index tensors once
and edits those rows with one or two vectorised ops. A processor whose knob no
row uses returns at once, so the defaults cost a few list scans per step.

Order (vLLM V1's): structured-output bitmask, allowed_token_ids, bad_words,
logit_bias, min_tokens, then repetition / frequency / presence penalties.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvik.tensor_transfer import to_device

if TYPE_CHECKING:
    from kvik.sample.sampler import LogitsProcessor, SamplingBatch

_NEG_INF = float("-inf")


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.int64), device)


def _fill(logits: torch.Tensor, rows: list[int], cols: list[int], value: float | bool) -> torch.Tensor:
    """logits[rows[i], cols[i]] = value (one scatter)."""
    if rows:
        logits.index_put_((_index(rows, logits.device), _index(cols, logits.device)), torch.tensor(value))
    return logits


def padded_ids(token_lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """The lists as one [len(token_lists), max_len] int64 tensor padded with ``pad`` (one host->device copy)."""
    longest = max((len(t) for t in token_lists), default=0)
    padded = np.full((len(token_lists), max(longest, 1)), pad, dtype=np.int64)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = tokens
    return to_device(torch.from_numpy(padded), device)


def apply_allowed_token_ids(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Rows with ``allowed_token_ids`` keep only those tokens."""
    if not any(p.allowed_token_ids for p in batch.distinct_params):
        return logits
    rows: list[int] = []
    cols: list[int] = []
    for i, params in enumerate(batch.params):
        if params.allowed_token_ids:
            rows.extend([i] * len(params.allowed_token_ids))
            cols.extend(params.allowed_token_ids)
    if not rows:
        return logits
    keep = _fill(torch.zeros_like(logits, dtype=torch.bool), rows, cols, True)  # [n, vocab]
    free = to_device(torch.tensor([not p.allowed_token_ids for p in batch.params]), logits.device)
    return logits.masked_fill_(~(keep | free[:, None]), _NEG_INF)


def apply_bad_words(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Ban each bad word's last token where the output so far ends with the word's other tokens.

    A one-token bad word is banned always. ``bad_words_token_ids`` is filled
    by the engine from ``bad_words`` at admission.
    """
    if not any(p.bad_words_token_ids for p in batch.distinct_params):
        return logits
    rows: list[int] = []
    cols: list[int] = []
    for i, params in enumerate(batch.params):
        words = params.bad_words_token_ids
        if not words:
            continue
        output = batch.output_token_ids[i] if batch.output_token_ids else []
        for word in words:
            prefix = len(word) - 1
            if prefix == 0 or (len(output) >= prefix and list(output[-prefix:]) == list(word[:-1])):
                rows.append(i)
                cols.append(word[-1])
    return _fill(logits, rows, cols, _NEG_INF)


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Add each row's ``logit_bias[token]`` to that token's logit (OpenAI's logit_bias)."""
    if not any(p.logit_bias for p in batch.distinct_params):
        return logits
    rows: list[int] = []
    cols: list[int] = []
    bias: list[float] = []
    for i, params in enumerate(batch.params):
        if params.logit_bias:
            rows.extend([i] * len(params.logit_bias))
            cols.extend(params.logit_bias.keys())
            bias.extend(params.logit_bias.values())
    if rows:
        values = to_device(torch.tensor(bias, dtype=logits.dtype), logits.device)
        logits.index_put_((_index(rows, logits.device), _index(cols, logits.device)), values, accumulate=True)
    return logits


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Until a row has ``min_tokens`` outputs, mask EOS (unless ``ignore_eos``) and its ``stop_token_ids``."""
    if not any(p.min_tokens for p in batch.distinct_params):
        return logits
    rows: list[int] = []
    cols: list[int] = []
    for i, (params, position) in enumerate(zip(batch.params, batch.output_positions, strict=True)):
        if position >= params.min_tokens:
            continue
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= batch.eos_token_ids
        rows.extend([i] * len(stops))
        cols.extend(stops)
    return _fill(logits, rows, cols, _NEG_INF)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF: prompt + output tokens), then frequency and presence (OpenAI: output tokens).

    repetition: a seen token's logit is divided by the penalty if positive,
    multiplied by it otherwise. frequency / presence:
    ``logit -= frequency * count + presence * (count > 0)`` with ``count`` the
    token's occurrences in the output so far.

    Sparse: the work is over each row's [max_len] token history, not its
    [vocab] logits (a 128k vocabulary would cost ~15 dense passes). Histories
    are padded into one tensor and read / written with one gather and one
    scatter into the flattened logits (outputs are sorted per row on the
    device to find each distinct token's first occurrence for presence).
    """
    if not any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in batch.distinct_params):
        return logits
    rows = [
        i
        for i, p in enumerate(batch.params)
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    ]
    if not rows:
        return logits
    params = [batch.params[i] for i in rows]
    logits = logits.contiguous()
    vocab = logits.shape[-1]
    device = logits.device
    flat = logits.view(-1)
    base = _index(rows, device)[:, None] * vocab  # [m, 1] offset of each row in flat
    empty: list[int] = []
    outputs = [batch.output_token_ids[i] if batch.output_token_ids else empty for i in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        prompts = [batch.prompt_token_ids[i] if batch.prompt_token_ids else empty for i in rows]
        seen = [list(p) + list(o) for p, o in zip(prompts, outputs, strict=True)]
        ids = padded_ids(seen, vocab, device)  # [m, L], pads (= vocab) after each row's tokens
        has_tokens = ids[:, :1] < vocab  # [m, 1]
        # Pads point at the row's first token; repeated tokens too write identical values.
        index = base + torch.where(ids < vocab, ids, ids[:, :1]).clamp_(max=vocab - 1)
        values = flat[index]
        penalty = _column([float(p.repetition_penalty) for p in params], logits)
        penalized = torch.where(values > 0, values / penalty, values * penalty)
        flat[index] = torch.where(has_tokens, penalized, values)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        ids = padded_ids(outputs, vocab, device).sort(dim=1).values
        valid = ids < vocab
        first = valid.clone()  # first occurrence of each distinct token in the sorted row
        first[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        frequency = _column([float(p.frequency_penalty) for p in params], logits)
        presence = _column([float(p.presence_penalty) for p in params], logits)
        delta = -(frequency * valid.to(logits.dtype) + presence * first.to(logits.dtype))  # pads add 0
        index = base + torch.where(valid, ids, torch.zeros_like(ids))
        flat.index_put_((index.flatten(),), delta.flatten(), accumulate=True)
    return logits


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> torch.Tensor:
    """Structured output: mask tokens a grammar forbids.

    ``bitmask``: [len(rows), ceil(vocab / 32)] int32, bit ``t % 32`` of word
    ``t // 32`` set when token ``t`` is allowed (xgrammar's layout). Unpacked
    on the device into a [len(rows), vocab] bool mask in one op.
    """
    if not rows:
        return logits
    vocab = logits.shape[-1]
    # Little-endian bytes of the int32 words, each unpacked through a [256, 8] table.
    data = np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint8)  # [m, 4 * words]
    table = _bit_table(logits.device)
    allowed = table[to_device(torch.from_numpy(data), logits.device).long()].flatten(1)  # [m, 32 * words]
    allowed = allowed[:, :vocab]
    if allowed.shape[1] < vocab:  # a tokenizer smaller than the (padded) model vocabulary: extra ids are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = _index(rows, logits.device)
    return logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(~allowed, _NEG_INF))


def apply_structured_output(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The grammar bitmask of the batch's structured-output rows (waits for it if still being computed)."""
    if batch.bitmask is None or not batch.bitmask_rows:
        return logits
    return apply_token_bitmask(logits, batch.bitmask_rows, batch.bitmask())


_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte value b."""
    if device not in _BIT_TABLES:
        _BIT_TABLES[device] = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(device)
    return _BIT_TABLES[device]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)[:, None]


def apply_request_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM's per-request ``SamplingParams.logits_processors`` (see :func:`call_request_processors`)."""
    if not any(p.logits_processors for p in batch.distinct_params):
        return logits
    for i, params in enumerate(batch.params):
        if params.logits_processors:
            output = list(batch.output_token_ids[i]) if batch.output_token_ids else []
            prompt = list(batch.prompt_token_ids[i]) if batch.prompt_token_ids else []
            logits[i] = call_request_processors(params.logits_processors, prompt, output, logits[i])
    return logits


def call_request_processors(
    processors: Sequence[Callable[..., torch.Tensor]], prompt: list[int], output: list[int], row: torch.Tensor
) -> torch.Tensor:
    """Each callable gets the row's output token ids (and, if it takes three arguments, the prompt's
    first) and the row's logits [vocab], and returns the new row. Python per row per step: slow by design."""
    shape = tuple(row.shape)
    for fn in processors:
        row = fn(prompt, output, row) if _num_positional(fn) >= 3 else fn(output, row)
        if not isinstance(row, torch.Tensor) or tuple(row.shape) != shape:
            raise ValueError(f"logits processor {fn!r} must return a tensor of shape {shape}")
    return row


def _num_positional(fn: Callable[..., object]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in sig.parameters.values())


DEFAULT_LOGITS_PROCESSORS: tuple[LogitsProcessor, ...] = (
    apply_structured_output,
    apply_allowed_token_ids,
    apply_bad_words,
    apply_logit_bias,
    apply_min_tokens,
    apply_penalties,
    apply_request_processors,
)
