"""What a pooling request asks for (vLLM's ``PoolingParams`` names)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

PoolingTask = Literal["embed", "classify"]


class PoolingType(str, Enum):
    """How a request's final hidden states become one vector."""

    LAST = "LAST"  # the last token's state (decoder embedders, sequence classifiers)
    MEAN = "MEAN"  # the mean over every token (sentence-transformers' default)
    CLS = "CLS"  # the first token's state (BERT-style)

    @property
    def reads_every_token(self) -> bool:
        """MEAN and CLS need the states of tokens a prefix-cache hit would skip."""
        return self is not PoolingType.LAST


@dataclass(slots=True)
class PoolingParams:
    """Per-request pooling options.

    ``dimensions`` keeps the first that many embedding dimensions (Matryoshka
    models), before normalisation; ``normalize`` (None: the model's setting)
    scales embeddings to unit length; ``activation`` turns classification
    logits into probabilities (softmax, or sigmoid for a single label).
    ``pooling_type`` is filled in by the engine from the model's pooler setup.
    """

    task: PoolingTask = "embed"
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool = True
    truncate_prompt_tokens: int | None = None
    pooling_type: PoolingType | None = None

    def __post_init__(self) -> None:
        if self.task not in ("embed", "classify"):
            raise ValueError(f"pooling task must be 'embed' or 'classify', got {self.task!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < -1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or >= 0, got {self.truncate_prompt_tokens}")
