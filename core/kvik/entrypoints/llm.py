"""The offline Python API: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from kvik.config import EngineConfig
from kvik.engine.llm_engine import LLMEngine
from kvik.outputs import RequestOutput
from kvik.sampling_params import SamplingParams

Prompt = str | Sequence[int]
ChatMessages = list[dict[str, str]]


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
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        ``prompts`` is a string, a list of token ids, or a list of either.
        """
        prompt_list = _as_prompt_list(prompts)
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
            engine.prepare_request(rid, p, sp, priority[i] if priority else 0)
            for i, (rid, p, sp) in enumerate(zip(ids, prompt_list, params_list, strict=False))
        ]
        for item in prepared:
            engine.add_prepared(item)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations: Sequence[ChatMessages]
        if messages and isinstance(messages[0], dict):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = messages  # type: ignore[assignment]
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(
        self, conversation: ChatMessages, add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template= or use generate()")
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _run(self, ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req", file=sys.stderr)
        try:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        results[output.request_id] = output
                        pending.discard(output.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]  # a single list of token ids
    for p in items:
        if not isinstance(p, str) and not (isinstance(p, Sequence) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
    return items  # type: ignore[return-value]
