"""The engine's half of pooling (numpy, torch-free): a request's options applied to the runner's raw row."""

from __future__ import annotations

import numpy as np

from kvik.pooling.params import PoolingParams


def finish_pooled(raw: np.ndarray, params: PoolingParams, default_normalize: bool) -> list[float]:
    """A request's vector from the runner's raw row: truncation and normalisation, or class probabilities."""
    return finish_pooled_rows([raw], [params], default_normalize)[0]


def finish_pooled_rows(
    rows: list[np.ndarray], params: list[PoolingParams], default_normalize: bool
) -> list[list[float]]:
    """:func:`finish_pooled` for a step's rows. Rows that share their options and length (a step of one
    embedding call: the usual case) go through numpy together, so the per-request cost is one ``tolist``;
    each row's arithmetic is the same either way (row-wise reductions), so a vector does not depend on
    its batch."""
    if not rows:
        return []
    first = params[0]
    if len(rows) > 1 and all(p == first for p in params) and all(r.shape == rows[0].shape for r in rows):
        return _finish(np.stack(rows), first, default_normalize).tolist()  # type: ignore[no-any-return]
    return [_finish(r[None], p, default_normalize)[0].tolist() for r, p in zip(rows, params, strict=True)]


def _finish(raw: np.ndarray, params: PoolingParams, default_normalize: bool) -> np.ndarray:
    """``raw`` [rows, width] -> float64 [rows, width'] for one set of options."""
    vectors = raw.astype(np.float64)
    if params.task == "classify":
        if not params.activation:
            return vectors
        if vectors.shape[1] == 1:  # one label: a relevance logit
            return 1.0 / (1.0 + np.exp(-vectors))
        shifted = np.exp(vectors - vectors.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    if params.dimensions is not None:
        vectors = vectors[:, : params.dimensions]  # Matryoshka: the leading dimensions, then normalise
    normalize = default_normalize if params.normalize is None else params.normalize
    if normalize:
        norms = np.sqrt(np.add.reduce(vectors * vectors, axis=1, keepdims=True))
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors
