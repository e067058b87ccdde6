"""Pooling models: embeddings, classification and scoring through the same engine.

A pooling request is a prompt that is prefilled and never sampled: the runner
reduces the final hidden states of its tokens to one vector (last token, mean
or first/CLS token), a classification model's head turns that into logits, and
the engine post-processes it per request (Matryoshka truncation, normalisation,
softmax). See docs/pooling.md.
"""

from kvik.pooling.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from kvik.pooling.params import PoolingParams, PoolingType

__all__ = [
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "PoolingOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "PoolingType",
    "ScoringOutput",
    "ScoringRequestOutput",
]
