"""InputProcessor: a request tokenized and checked against the model, before the engine sees it.

It holds what validation needs (the resolved config, the model's config, the tokenizer, the
runner's abilities, the pooler, a LoRA check) and no engine state, so it runs on any thread and
in any process: :class:`~kvik.engine.llm_engine.LLMEngine` keeps one, and so does the front of an
engine that runs in a process of its own (:mod:`kvik.engine.engine_process`), which turns requests
into :class:`PreparedRequest` objects there and sends only those.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvik.config import ModelConfig, ResolvedConfig
from kvik.engine.batch_tokenize import batch_token_ids
from kvik.inputs import token_id_list
from kvik.lora.request import LoRARequest
from kvik.pooling.params import PoolingParams
from kvik.pooling.setup import PoolerSetup
from kvik.sample.admission import prepare_params
from kvik.sampling_params import SamplingParams
from kvik.structured.manager import StructuredOutputManager


@dataclass(slots=True)
class PreparedRequest:
    """A validated, tokenized request ready for ``LLMEngine.add_prepared``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    pooling_params: PoolingParams | None = None  # a pooling request (embedding / classification)
    lora_request: LoRARequest | None = None  # the adapter it runs under (None: the base model)


@dataclass
class InputProcessor:
    """Tokenizes and validates generation and pooling requests against one loaded model."""

    config: ResolvedConfig
    model_config: ModelConfig
    tokenizer: Any
    platform_name: str  # for error messages
    structured_output: bool  # the model runner can apply grammars
    structured: StructuredOutputManager  # compiles (and caches) a request's grammar: an invalid one fails here
    pooler_setup: PoolerSetup | None = None  # the checkpoint's pooler when runner="pooling"
    pooling_task: str = "embed"  # what the pooling model answers: "embed" or "classify"
    check_lora: Callable[[LoRARequest], Any] | None = None  # raises ValueError for a bad adapter; None: LoRA off

    def prepare_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> PreparedRequest:
        """Tokenize and validate a generation request; ValueError names what is wrong."""
        params = params or SamplingParams()
        if lora_request is not None:
            if self.check_lora is None:
                raise ValueError(
                    f"lora_request {lora_request.lora_name!r} given but LoRA is off; start the engine with enable_lora=True"
                )
            self.check_lora(lora_request)  # ValueError naming a bad path, config or rank
        if self.config.runner == "pooling":
            raise ValueError(
                f"model {self.config.model_name!r} is served with runner='pooling': it answers embedding, "
                "classification and score requests, not text generation"
            )
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = list(self.tokenizer.encode(prompt)) if prompt else []
        else:
            text = None
            token_ids = token_id_list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        keep = params.truncate_prompt_tokens
        if keep is not None:  # vLLM's left truncation: the end of the prompt is what the model continues
            keep = self.model_config.max_model_len - 1 if keep == -1 else keep
            if len(token_ids) > keep:
                token_ids, text = token_ids[-keep:], None
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        params = prepare_params(params, vocab, self.tokenizer)
        if params.guided is not None and not self.structured_output:
            raise ValueError(
                f"structured output (guided_* / response_format) is not supported by the {self.platform_name} "
                "platform's model runner; drop the constraint or use a platform that supports it (cpu, cuda)"
            )
        self.structured.compile(params)  # ValueError (the compiler's message) for an invalid grammar or schema
        max_len = self.model_config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {max_len} "
                f"(prompt plus at least one generated token must fit); shorten the prompt"
            )
        return PreparedRequest(
            request_id, text, token_ids, params, priority, arrival_time or time.time(), lora_request=lora_request
        )

    def prepare_pooling_requests(
        self, request_ids: Sequence[str], prompts: Sequence[str | Sequence[int]], params: Sequence[PoolingParams]
    ) -> list[PreparedRequest]:
        """:meth:`prepare_pooling_request` for many inputs, their texts tokenized in one call: a fast
        tokenizer encodes a batch on its own threads, where one call per text (2,048 texts of 512
        tokens: about a second on one core) can take as long as the GPU's forward of them."""
        encoded = iter(batch_token_ids(self.tokenizer, [p for p in prompts if isinstance(p, str)]))
        return [
            self.prepare_pooling_request(rid, p, pp, token_ids=next(encoded) if isinstance(p, str) else None)
            for rid, p, pp in zip(request_ids, prompts, params, strict=True)
        ]

    def prepare_pooling_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: PoolingParams,
        arrival_time: float | None = None,
        token_ids: list[int] | None = None,
    ) -> PreparedRequest:
        """Tokenize and validate a pooling request; see :mod:`kvik.pooling`.

        ``token_ids``: ``prompt``'s tokens when the caller has them (:meth:`prepare_pooling_requests`)."""
        setup = self.pooler_setup
        if setup is None:
            raise ValueError(
                f"model {self.config.model_name!r} is a generation model (runner='generate'); embedding, "
                "classification and score requests need a pooling model or runner='pooling'"
            )
        if params.task != self.pooling_task:
            what = "a classifier (use classify / score)" if self.pooling_task == "classify" else "an embedding model"
            raise ValueError(f"this model is {what}; it cannot serve {params.task!r} requests")
        if params.dimensions is not None:
            if params.task != "embed":
                raise ValueError("dimensions applies to embeddings only")
            if params.dimensions > self.model_config.hidden_size:
                raise ValueError(
                    f"dimensions={params.dimensions} exceeds the model's embedding size {self.model_config.hidden_size}"
                )
        if token_ids is None:
            token_ids = list(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else token_id_list(prompt)
        if not token_ids:
            raise ValueError("the input is empty; give at least one token")
        max_len = self.model_config.max_model_len
        keep = params.truncate_prompt_tokens
        if keep is not None:  # as for generation: keep the end (last-token pooling reads it)
            keep = max_len if keep == -1 else keep
            token_ids = token_ids[-keep:] if keep else token_ids
        if len(token_ids) > max_len:
            raise ValueError(
                f"the input has {len(token_ids)} tokens but max_model_len is {max_len}; shorten it or set "
                "truncate_prompt_tokens"
            )
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:  # min/max run in C; the list only on failure
            bad = [t for t in token_ids if not 0 <= t < vocab]
            raise ValueError(f"input token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        resolved = replace(params, pooling_type=setup.pooling_type)
        text = prompt if isinstance(prompt, str) else None
        return PreparedRequest(request_id, text, token_ids, SamplingParams(max_tokens=1), 0, arrival_time or time.time(), resolved)
