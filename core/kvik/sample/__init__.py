"""Turning logits into tokens: the batched sampler."""

from kvik.sample.sampler import Sampler, SamplingBatch

__all__ = ["Sampler", "SamplingBatch"]
