"""Request bodies of the pooling routes: /v1/embeddings (OpenAI), /v1/rerank (Jina/Cohere as vLLM serves it),
/score and /classify (vLLM's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt, StrictStr

from kvik_server.protocol import OpenAIModel

TokenIds = list[StrictInt]


class PoolingFields(OpenAIModel):
    model: str | None = None
    user: str | None = None
    # Keep only the last N tokens of each input (-1: up to max_model_len); over-length input is a 400 otherwise.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class EmbeddingRequest(PoolingFields):
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    normalize: bool | None = None  # vLLM's extension: None follows the model's setup


class RerankDocument(OpenAIModel):
    text: StrictStr


class RerankRequest(PoolingFields):
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True


class ScoreRequest(PoolingFields):
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]


class ClassifyRequest(PoolingFields):
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
