"""Turning logits into tokens.

``kvik.sample.batch`` (the sampling-batch description, prompt-logprob rows) is
torch-free; ``kvik.sample.sampler`` is the batched torch sampler. Importing
this package imports neither, so a runner without torch (MLX) can use the first.
"""
