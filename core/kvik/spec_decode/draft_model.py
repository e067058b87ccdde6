"""``method: "draft_model"``: a smaller model of the same tokenizer drafts ``k`` tokens per step.

Any checkpoint kvik can load can draft, as long as its tokenizer is the target's
(checked at load: token strings and ids must match exactly; a draft whose
vocabulary is padded to another size is cut or padded to the target's). The
draft runs on the target's platform through a second model runner of the same
kind (so on CUDA its one-token steps and its catch-up step replay its own CUDA
graphs, the latter a verify-shaped one of up to k + 2 tokens per request), with its KV
in the shared block pool (see :mod:`kvik.spec_decode.drafter`). Each step costs
the draft one forward over the target's known rows plus ``k - 1`` one-token
forwards over the sampling requests.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvik.config import EngineConfig
from kvik.models.hub import resolve_model_path
from kvik.models.model_config import build_model_config, resolve_format
from kvik.scheduling.output import ScheduledRequest
from kvik.spec_decode.drafter import _DRAFT_PARAMS, Drafter, RunnerDraftProposer
from kvik.tensor_transfer import to_device

if TYPE_CHECKING:
    from kvik.worker.kit.layout import StepLayout
    from kvik.worker.torch_runner import TorchModelRunner


class DraftModelProposer(RunnerDraftProposer):
    drafter = "kvik.spec_decode.draft_model:DraftModelDrafter"


def same_tokenizer(target: Any, draft: Any) -> str | None:
    """None when the two tokenizers map the same strings to the same ids, else what differs."""
    a, b = target.get_vocab(), draft.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"the target's has {len(a)} tokens, the draft's {len(b)}"
    differing = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
    return f"they disagree on {', '.join(f'{t!r}: {i}' for t, i in differing)}"


class DraftModelDrafter(Drafter):
    """A second runner of the target's kind over the draft checkpoint."""

    def __init__(self, config: Any, runner: TorchModelRunner) -> None:
        super().__init__(config, runner)
        self.draft: TorchModelRunner | None = None
        self.num_pool_blocks = 0

    def load(self) -> None:
        runner = self.runner
        assert self.config.model is not None  # SpeculativeConfig requires it for this method
        path = resolve_model_path(self.config.model)
        fmt = resolve_format(path, runner.manager, trust_remote_code=runner.config.trust_remote_code)
        why = same_tokenizer(self._target_tokenizer(), fmt.load_tokenizer())
        if why is not None:
            raise ValueError(
                f"speculative_config: the draft model {self.config.model!r} does not share the target's tokenizer "
                f"({why}); a draft model must use the same tokenizer (the same model family)"
            )
        engine_config = EngineConfig(model=path, dtype=runner.model_config.dtype)
        model_config = build_model_config(engine_config, fmt, runner.manager, runner.platform)
        model_config.max_model_len = runner.model_config.max_model_len
        config = replace(
            runner.config, model=path, model_name=self.config.model, tokenizer=path, speculative_config=None
        )
        from kvik.worker.torch_runner import TorchModelRunner

        draft = runner.platform.create_model_runner(config, model_config)
        if not isinstance(draft, TorchModelRunner):
            raise ValueError(f"the {runner.platform.name} platform's runner cannot run a draft model")
        # Its catch-up step recomputes up to k accepted drafts plus the bonus token after the
        # request's last known one: k + 2 tokens per sampling request (CUDA: a verify-shaped graph).
        draft.verify_tokens_per_request = self.k + 2
        draft.load_model()
        self.draft = draft

    def _target_tokenizer(self) -> Any:
        cfg = self.runner.config
        if cfg.tokenizer != cfg.model:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
        return resolve_format(cfg.model, self.runner.manager, trust_remote_code=cfg.trust_remote_code).load_tokenizer()

    def weight_bytes(self) -> int:
        if self.draft is None:
            return 0
        scratch = self.draft.kv_block_bytes(self.runner.block_size) * self._scratch_total()
        return self.draft.weight_bytes() + scratch

    def kv_block_bytes(self, block_size: int) -> int:
        return 0 if self.draft is None else self.draft.kv_block_bytes(block_size)

    def _scratch_total(self) -> int:
        return self.runner.config.max_num_seqs * self.num_scratch_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        assert self.draft is not None
        self.draft.model_config.max_model_len = self.runner.model_config.max_model_len
        self.num_pool_blocks = num_blocks
        self.draft.initialize_kv_cache(num_blocks + self._scratch_total())

    @torch.inference_mode()
    def propose(self, layout: StepLayout, hidden: torch.Tensor, sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        draft = self.draft
        self._probs = {}
        if draft is None or not draft.kv_caches or not self.num_pool_blocks:
            return {}  # a runner-internal step before the caches exist (profiling)
        steps, owners, params, positions = self.catch_up(layout, sampled)
        if not steps:
            return {}
        tables = self.draft_tables(layout, owners, self.num_pool_blocks)
        rows = np.arange(len(steps), dtype=np.int64)
        first = draft.build_layout(steps, tables, rows)
        out = draft.run_model(draft.prepare_inputs(first))
        limit = self.config.disable_by_batch_size
        if not params or (limit and len(params) >= limit):
            return {}  # the catch-up above kept the draft KV in step; no drafts under load
        first_logits = self._logits(out, first.logits_indices)
        ids = [s.request_id for s in steps if s.sample]
        draft_rows = rows[[s.sample for s in steps]]

        def step(tokens: torch.Tensor, j: int) -> torch.Tensor:
            batch = [
                ScheduledRequest(rid, [0], pos + j, [], True, _DRAFT_PARAMS)
                for rid, pos in zip(ids, positions, strict=True)
            ]
            layout_j = draft.build_layout(batch, tables, draft_rows)
            inputs = draft.prepare_inputs(layout_j)
            inputs.input_ids[: len(batch)] = tokens  # the previous drafts, still on the device
            return self._logits(draft.run_model(inputs), layout_j.logits_indices)

        drafts, probs, is_sampled = self.run_drafts(first_logits, params, step)
        host = drafts.cpu().tolist()
        self.remember(ids, host, probs, is_sampled)
        return dict(zip(ids, host, strict=True))

    def _logits(self, hidden: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        assert self.draft is not None and self.draft.model is not None
        index = to_device(torch.from_numpy(rows), hidden.device)
        return self.draft.model.compute_logits(hidden.index_select(0, index))  # type: ignore[operator]

    def shutdown(self) -> None:
        if self.draft is not None:
            self.draft.shutdown()
