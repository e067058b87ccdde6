"""The engine's half of pooling (numpy, torch-free): a request's options applied to the runner's raw row."""

from __future__ import annotations

import numpy as np

from kvik.pooling.params import PoolingParams


def finish_pooled(raw: np.ndarray, params: PoolingParams, default_normalize: bool) -> list[float]:
    """A request's vector from the runner's raw row: truncation and normalisation, or class probabilities."""
    vector = raw.astype(np.float64)
    if params.task == "classify":
        if not params.activation:
            return vector.tolist()  # type: ignore[no-any-return]
        if vector.shape[0] == 1:  # one label: a relevance logit
            return [float(1.0 / (1.0 + np.exp(-vector[0])))]
        shifted = np.exp(vector - vector.max())
        return (shifted / shifted.sum()).tolist()  # type: ignore[no-any-return]
    if params.dimensions is not None:
        vector = vector[: params.dimensions]  # Matryoshka: the leading dimensions, then normalise
    normalize = default_normalize if params.normalize is None else params.normalize
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector.tolist()  # type: ignore[no-any-return]
