"""Sample and prompt logprobs gathered in MLX, with the torch runner's semantics (kvik.sample.logprobs).

Raw-distribution logprobs (``log_softmax`` of the logits before any
processor or filter); each entry holds the chosen / next prompt token first,
then the row's top ``k``; the chosen token's rank is 1 + the number of tokens
strictly more likely. The host side (arrays -> RunnerOutput) is the runner
kit's :func:`kvik.worker.kit.assemble_output`, shared with the torch runner.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from kvik.worker.kit import TopLogprobs


def gather_logprobs(logits: mx.array, targets: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """logits [n, vocab], targets [n] -> (ids [n, 1 + k], logprobs [n, 1 + k], target ranks [n]), lazily."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    target_lp = mx.take_along_axis(logprobs, targets[:, None], axis=-1)  # [n, 1]
    ranks = mx.sum(logprobs > target_lp, axis=-1) + 1
    ids, lps = targets[:, None].astype(mx.int32), target_lp
    if k > 0:
        top = mx.argsort(-logprobs, axis=-1)[:, :k].astype(mx.int32)
        ids = mx.concatenate([ids, top], axis=1)
        lps = mx.concatenate([lps, mx.take_along_axis(logprobs, top, axis=-1)], axis=1)
    return ids, lps, ranks


def to_host(gathered: tuple[mx.array, mx.array, mx.array]) -> TopLogprobs:
    """Evaluated (ids, logprobs, ranks) -> the kit's host arrays."""
    ids, lps, ranks = (np.array(a) for a in gathered)
    return TopLogprobs(ids, lps.astype(np.float32, copy=False), ranks)
