"""The pooling routes: /v1/embeddings, /v1/rerank, /score and /classify over ``AsyncLLM.encode_batch``.

Every input of a request is validated before any runs; problems (empty input, an
over-length text without ``truncate_prompt_tokens``, a pooling request to a
generation model, an embedding request to a classifier) are 400s naming them.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from kvik.pooling.outputs import PoolingRequestOutput
from kvik.pooling.params import PoolingParams
from kvik.pooling.scoring import cosine, pair_token_ids, pair_up, relevance

from kvik_server.context import ServingContext
from kvik_server.errors import APIError, bad_request
from kvik_server.json_body import check_text
from kvik_server.protocol_pooling import ClassifyRequest, EmbeddingRequest, RerankRequest, ScoreRequest

Prompt = str | list[int]


def split_inputs(value: Any, param: str) -> list[Prompt]:
    """OpenAI's input shapes (a string, strings, token ids, lists of token ids) as a list of inputs."""
    if isinstance(value, str):
        inputs: list[Prompt] = [value]
    elif value and isinstance(value[0], int):
        inputs = [list(value)]
    else:
        inputs = list(value)
    if not inputs:
        raise bad_request(f"'{param}' is an empty list; give at least one input.", param=param)
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            check_text(item, param)
        if len(item) == 0:
            raise bad_request(f"'{param}[{i}]' is empty; every input needs at least one token.", param=param)
    return inputs


async def run_pooling(
    ctx: ServingContext, prompts: list[Prompt], params: PoolingParams, prefix: str, param: str
) -> list[PoolingRequestOutput]:
    """Run the inputs as one batch of engine requests; engine refusals become 400s naming ``param``."""
    ctx.admit(1, [len(p) for p in prompts])
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    now = time.monotonic()
    for rid, prompt in zip(ids, prompts, strict=True):
        ctx.inflight[rid] = ctx.engine_pending[rid] = now
        ctx.admission.add(rid, len(prompt), 1)
    try:
        return list(await ctx.engine.encode_batch(prompts, params, ids))
    except ValueError as exc:
        raise bad_request(str(exc), param=param, code="invalid_value") from None
    except RuntimeError as exc:
        if type(exc).__name__ != "EngineDeadError":
            raise
        raise APIError(503, f"The engine cannot take requests: {exc}", code="engine_unavailable",
                       headers={"Retry-After": "5"}) from None  # fmt: skip
    finally:
        for rid in ids:
            ctx._release(rid)


def _usage(outputs: list[PoolingRequestOutput]) -> dict[str, int]:
    tokens = sum(o.num_prompt_tokens for o in outputs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


async def create_embeddings(ctx: ServingContext, body: EmbeddingRequest) -> JSONResponse:
    _no_adapter(ctx.check_model(body.model))
    prompts = split_inputs(body.input, "input")
    params = PoolingParams(
        dimensions=body.dimensions, normalize=body.normalize, truncate_prompt_tokens=body.truncate_prompt_tokens
    )
    outputs = await run_pooling(ctx, prompts, params, f"embd-{uuid.uuid4().hex}", "input")
    data = []
    for i, out in enumerate(outputs):
        vector: Any = out.outputs.data
        if body.encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return JSONResponse({
        "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": ctx.model_name,
        "data": data, "usage": _usage(outputs),
    })  # fmt: skip


async def _scores(
    ctx: ServingContext, pairs: list[tuple[str, str]], truncate: int | None, param: str
) -> tuple[list[float], dict[str, int]]:
    """Relevance of each (query, document) pair: a cross-encoder's, or an embedder's cosine similarity."""
    prefix = f"score-{uuid.uuid4().hex}"
    if ctx.engine.engine.pooling_task == "classify":
        for q, d in pairs:
            check_text(q, param)
            check_text(d, param)
        prompts: list[Prompt] = [await ctx.run_tokenizer(pair_token_ids, ctx.tokenizer, q, d) for q, d in pairs]
        outputs = await run_pooling(
            ctx, prompts, PoolingParams(task="classify", truncate_prompt_tokens=truncate), prefix, param
        )
        try:
            return [relevance(o.outputs.data) for o in outputs], _usage(outputs)
        except ValueError as exc:
            raise bad_request(str(exc), param=param) from None
    texts = sorted({t for pair in pairs for t in pair})
    outputs = await run_pooling(ctx, list(texts), PoolingParams(truncate_prompt_tokens=truncate), prefix, param)
    vectors = {t: o.outputs.data for t, o in zip(texts, outputs, strict=True)}
    return [cosine(vectors[q], vectors[d]) for q, d in pairs], _usage(outputs)


def _pairs(first: str | list[str], second: str | list[str], param: str) -> list[tuple[str, str]]:
    try:
        return pair_up(first, second)
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from None


async def create_score(ctx: ServingContext, body: ScoreRequest) -> JSONResponse:
    _no_adapter(ctx.check_model(body.model))
    scores, usage = await _scores(
        ctx, _pairs(body.text_1, body.text_2, "text_2"), body.truncate_prompt_tokens, "text_2"
    )
    return JSONResponse({
        "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": ctx.model_name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)], "usage": usage,
    })  # fmt: skip


async def create_rerank(ctx: ServingContext, body: RerankRequest) -> JSONResponse:
    _no_adapter(ctx.check_model(body.model))
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    if not docs:
        raise bad_request("'documents' is an empty list; give at least one document.", param="documents")
    scores, usage = await _scores(ctx, _pairs(body.query, docs, "documents"), body.truncate_prompt_tokens, "documents")
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    if body.top_n is not None and body.top_n > 0:
        order = order[: body.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            item["document"] = {"text": docs[i]}
        results.append(item)
    return JSONResponse({
        "id": f"rerank-{uuid.uuid4().hex}", "model": ctx.model_name, "usage": {"total_tokens": usage["total_tokens"]},
        "results": results,
    })  # fmt: skip


async def create_classify(ctx: ServingContext, body: ClassifyRequest) -> JSONResponse:
    _no_adapter(ctx.check_model(body.model))
    prompts = split_inputs(body.input, "input")
    params = PoolingParams(task="classify", truncate_prompt_tokens=body.truncate_prompt_tokens)
    outputs = await run_pooling(ctx, prompts, params, f"classify-{uuid.uuid4().hex}", "input")
    labels = getattr(ctx.engine.model_config.hf_config, "id2label", None) or {}
    data = []
    for i, out in enumerate(outputs):
        probs = out.outputs.data
        best = int(np.argmax(probs))
        label = labels.get(best, labels.get(str(best), f"LABEL_{best}"))
        data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
    return JSONResponse({
        "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": ctx.model_name,
        "data": data, "usage": _usage(outputs),
    })  # fmt: skip


def _no_adapter(lora: object) -> None:
    if lora is not None:
        raise bad_request("LoRA adapters serve text generation only; name the base model for pooling requests",
                          param="model")  # fmt: skip
