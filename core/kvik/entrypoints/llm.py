"""The offline Python API: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvik.config import EngineConfig
from kvik.engine.llm_engine import LLMEngine
from kvik.entrypoints.beam_search import BeamSearchOutput, as_token_ids, beam_search
from kvik.entrypoints.frozen_heap import frozen_heap
from kvik.executor.profiling import ProfileSummary
from kvik.inputs import PromptType, parse_prompts
from kvik.lora.request import LoRARequest
from kvik.outputs import RequestOutput
from kvik.pooling.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    ScoringRequestOutput,
)
from kvik.pooling.params import PoolingParams
from kvik.sampling_params import BeamSearchParams, SamplingParams

ChatMessages = list[dict[str, Any]]


# Texts a pooling call tokenizes at a time (LLM.encode, on a thread): later chunks overlap earlier steps.
POOLING_CHUNK = 256
_SPENT = object()


class LLM:
    """Batch generation with continuous batching, vLLM-style.

    Engine options are keyword arguments with vLLM's names (``dtype``,
    ``max_model_len``, ``enable_prefix_caching``, ``max_num_batched_tokens``,
    ``max_num_seqs``, ``gpu_memory_utilization``, ...); see :class:`EngineConfig`.
    ``model=None`` uses the bundled default model when it is installed.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        *,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        A prompt is a string, a list of token ids, ``{"prompt": str}`` or
        ``{"prompt_token_ids": [...]}`` (vLLM's TextPrompt / TokensPrompt); ``prompts``
        is one prompt or a list. ``prompt_token_ids=`` is vLLM's older keyword form.
        ``lora_request``: one adapter for every prompt, or one (or None) per prompt
        (needs ``enable_lora=True``; see docs/lora.md).
        """
        prompt_list = parse_prompts(prompts, prompt_token_ids)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras: list[LoRARequest | None] = [lora_request] * len(prompt_list)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompt_list):
                raise ValueError(f"got {len(loras)} lora_requests for {len(prompt_list)} prompts; pass one, or one per prompt")
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts; pass one, or one per prompt"
                )
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError(f"got {len(priority)} priorities for {len(prompt_list)} prompts")
        # Offline callers only see finished outputs: let the engine skip per-step assembly.
        final: dict[int, SamplingParams] = {}
        params_list = [final.setdefault(id(p), p.clone(output_kind="final_only")) for p in params_list]
        engine = self.llm_engine
        ids = [str(next(self._counter)) for _ in prompt_list]
        # Validate everything before queueing anything, so a bad prompt fails the call cleanly.
        prepared = [
            engine.prepare_request(rid, p, sp, priority[i] if priority else 0, lora_request=loras[i])
            for i, (rid, p, sp) in enumerate(zip(ids, prompt_list, params_list, strict=False))
        ]
        for item in prepared:
            engine.add_prepared(item)
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the ``params.beam_width`` most likely continuations of each prompt.

        Deterministic; see :mod:`kvik.entrypoints.beam_search` for the ranking.
        """
        tokenizer = self.get_tokenizer()
        token_prompts = [as_token_ids(p, tokenizer) for p in parse_prompts(prompts)]
        engine = self.llm_engine

        def run(batch: list[list[int]], step: SamplingParams) -> list[RequestOutput]:
            return self.generate(batch, step, use_tqdm=False, lora_request=lora_request)

        def decode(tokens: list[int]) -> str:
            return str(tokenizer.decode(tokens, skip_special_tokens=True))

        return beam_search(
            run,
            token_prompts,
            params,
            eos_token_ids=engine.model_config.eos_token_ids,
            max_model_len=engine.model_config.max_model_len,
            decode=decode if tokenizer is not None else None,
        )

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate (vLLM's signature).

        ``tools`` and ``chat_template_kwargs`` go to the template; ``continue_final_message``
        leaves the last (assistant) message open for the model to continue.
        """
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs is not supported by kvik yet")
        if chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError(
                f"chat_template_content_format must be 'auto', 'string' or 'openai', got {chat_template_content_format!r}"
            )
        conversations: Sequence[ChatMessages]
        if messages and isinstance(messages[0], dict):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = messages  # type: ignore[assignment]
        prompts = [
            self.apply_chat_template(
                c, add_generation_prompt, chat_template, continue_final_message, tools, chat_template_kwargs
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(
        self,
        conversation: ChatMessages,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template= or use generate()")
        if continue_final_message and add_generation_prompt:
            # vLLM's rule too: a new assistant turn and an open last message contradict each other.
            raise ValueError("continue_final_message=True needs add_generation_prompt=False")
        if continue_final_message and (not conversation or conversation[-1].get("role") != "assistant"):
            raise ValueError("continue_final_message=True needs the last message to be the assistant's")
        kwargs = dict(chat_template_kwargs or {})
        ids = tokenizer.apply_chat_template(
            [_text_message(m) for m in conversation],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            chat_template=chat_template,
            tools=tools,
            **kwargs,
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    # -- pooling models (kvik.pooling; vLLM's names) ---------------------------------
    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[PoolingRequestOutput]:
        """Pool every prompt (one engine batch); outputs come back in input order."""
        prompt_list = parse_prompts(prompts)
        if isinstance(pooling_params, PoolingParams) or pooling_params is None:
            params_list = [pooling_params or PoolingParams()] * len(prompt_list)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} PoolingParams for {len(prompt_list)} prompts")
        engine = self.llm_engine
        ids = [str(next(self._counter)) for _ in prompt_list]

        def feed() -> Generator[None, None, None]:
            # Tokenizing is host work the device can overlap: a thread prepares the chunks (the Rust
            # tokenizer releases the GIL) while the engine steps what is already added. A bad text
            # still fails the whole call, as it did.
            pool = ThreadPoolExecutor(1, thread_name_prefix="kvik-tokenize")
            try:
                chunks = [
                    pool.submit(engine.prepare_pooling_requests, ids[s : s + POOLING_CHUNK],
                                prompt_list[s : s + POOLING_CHUNK], params_list[s : s + POOLING_CHUNK])
                    for s in range(0, len(ids), POOLING_CHUNK)
                ]  # fmt: skip
                for chunk in chunks:
                    while not chunk.done() and engine.has_unfinished_requests():
                        yield  # one more step while the chunk is tokenized
                    for item in chunk.result():
                        engine.add_prepared(item)
                    yield
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        return self._run(ids, use_tqdm, feed())

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = False,
        *,
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``outputs.embedding``); ``dimensions`` keeps the leading ones (Matryoshka)."""
        params = pooling_params or PoolingParams(dimensions=dimensions, truncate_prompt_tokens=truncate_prompt_tokens)
        return [EmbeddingRequestOutput.from_base(o) for o in self.encode(prompts, params, use_tqdm)]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        use_tqdm: bool = False,
        *,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (``outputs.probs``) from a ``*ForSequenceClassification`` model."""
        params = PoolingParams(task="classify", truncate_prompt_tokens=truncate_prompt_tokens)
        return [ClassificationRequestOutput.from_base(o) for o in self.encode(prompts, params, use_tqdm)]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        use_tqdm: bool = False,
        *,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ScoringRequestOutput]:
        """Relevance of each ``data_2`` text to ``data_1`` (one text, or one per ``data_2`` text).

        A cross-encoder (a classifier) reads each pair as one input, the tokenizer's
        text-pair encoding; its score is the sigmoid of a single logit or the
        probability of class 1. An embedding model scores by cosine similarity.
        """
        from kvik.pooling.scoring import score_pairs

        return score_pairs(self, data_1, data_2, truncate_prompt_tokens, use_tqdm)

    def start_profile(self) -> None:
        """Start profiling every rank with torch.profiler (vLLM's name); generate, then :meth:`stop_profile`."""
        self.llm_engine.start_profile()

    def stop_profile(self, trace_dir: str | None = None) -> list[ProfileSummary]:
        """Stop profiling. Each rank's Chrome trace goes to ``trace_dir/rank{R}.json`` (or under
        ``$KVIK_TORCH_PROFILER_DIR``, vLLM's ``VLLM_TORCH_PROFILER_DIR``) when either is set; the
        return value is every rank's time by kernel (:class:`kvik.executor.profiling.ProfileSummary`)."""
        return self.llm_engine.stop_profile(trace_dir)

    def _run(
        self, ids: list[str], use_tqdm: bool | None, feed: Generator[None, None, None] | None = None
    ) -> list[Any]:
        """Step the engine until every request of ``ids`` finished; ``feed``, when given, adds them a
        chunk at a time (advanced once before the first step and once after each step until spent)."""
        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput | PoolingRequestOutput] = {}
        show = bool(use_tqdm)  # vLLM's default: a progress bar on stderr
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", file=sys.stderr)
        try:
            with frozen_heap():
                self._step_until_done(pending, results, bar, feed)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            if feed is not None:
                feed.close()  # its tokenizer thread stops (a failed call leaves no chunk running)
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def _step_until_done(
        self,
        pending: set[str],
        results: dict[str, RequestOutput | PoolingRequestOutput],
        bar: Any,
        feed: Generator[None, None, None] | None,
    ) -> None:
        engine = self.llm_engine
        feeding = feed is not None and next(feed, _SPENT) is not _SPENT
        while pending:
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
            outputs: list[RequestOutput | PoolingRequestOutput] = [*engine.step(), *engine.take_pooling_outputs()]
            if feeding:
                assert feed is not None
                feeding = next(feed, _SPENT) is not _SPENT
            for output in outputs:
                if output.finished and output.request_id in pending:
                    results[output.request_id] = output
                    pending.discard(output.request_id)
                    if bar is not None:
                        bar.update(1)


def _text_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of OpenAI text parts, as one string (kvik's models are text-only)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"only text content parts are supported (kvik serves text-only models), got {kind!r}")
        texts.append(str(part.get("text", "")))
    return {**message, "content": "\n".join(texts)}
