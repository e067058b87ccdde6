"""``method: "eagle" | "eagle3"``: a one-layer head drafts from the target's hidden states.

Row ``j`` of the head pairs the token at ``j + 1`` with the target's feature at ``j``
(:mod:`kvik.spec_decode.eagle_head`), so after a step the head catches up on the
target's known rows shifted by one, ending with the token the step sampled; a
prefill chunk's last row waits for the next chunk's first token (its feature is kept
until then). Then ``k - 1`` one-token steps feed the head its own output. The head's
KV lives in the shared block pool like a draft model's (:mod:`kvik.spec_decode.drafter`).

EAGLE-3 reads three intermediate residual streams of the target, captured by forward
pre-hooks on the target's decoder layers; a CUDA graph replay runs no hooks, so the
target runs eagerly under EAGLE-3 (``needs_eager_target``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvik.models.hub import resolve_model_path
from kvik.scheduling.output import ScheduledRequest
from kvik.spec_decode.drafter import _DRAFT_PARAMS, Drafter, RunnerDraftProposer
from kvik.spec_decode.eagle_head import EagleHead, read_head_config, read_head_weights
from kvik.tensor_transfer import to_device
from kvik.worker.kit.layout import StepLayout

if TYPE_CHECKING:
    from kvik.attention.backend import AttentionBackend
    from kvik.worker.torch_runner import TorchModelRunner


class EagleProposer(RunnerDraftProposer):
    drafter = "kvik.spec_decode.eagle:EagleDrafter"


class Eagle3Proposer(RunnerDraftProposer):
    drafter = "kvik.spec_decode.eagle:EagleDrafter"


class EagleDrafter(Drafter):
    def __init__(self, config: Any, runner: TorchModelRunner) -> None:
        super().__init__(config, runner)
        self.kind = config.method
        self.needs_eager_target = self.kind == "eagle3"
        self.has_decode_pass = True
        self.head: EagleHead | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.num_pool_blocks = 0
        self._aux: dict[int, torch.Tensor] = {}  # EAGLE-3: target layer -> its input residual stream [T, H]
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}  # request -> (feature, position) of a chunk's last row

    # -- loading --------------------------------------------------------------------------
    def load(self) -> None:
        runner = self.runner
        assert self.config.model is not None and runner.model is not None
        path = Path(resolve_model_path(self.config.model))
        layers = list(getattr(getattr(runner.model, "model", None), "layers", []))
        cfg = read_head_config(path, self.kind, len(layers))
        mc = runner.model_config
        problems = []
        if cfg.target_hidden_size != mc.hidden_size or (self.kind == "eagle" and cfg.hidden_size != mc.hidden_size):
            problems.append(f"its hidden size {cfg.hidden_size} does not fit the target's {mc.hidden_size}")
        if cfg.vocab_size != mc.vocab_size:
            problems.append(f"its vocabulary has {cfg.vocab_size} tokens, the target's {mc.vocab_size}")
        if self.kind == "eagle3" and not all(0 <= i < len(layers) for i in cfg.aux_layers):
            problems.append(f"its feature layers {cfg.aux_layers} are not all among the target's {len(layers)} layers")
        if problems:
            raise ValueError(
                f"speculative_config: {self.config.model!r} is not a {self.kind} head for this target: "
                + "; ".join(problems)
            )
        assert runner.attn_backend is not None
        backend = runner.attn_backend
        attns: list[AttentionBackend[torch.Tensor]] = [
            backend(cfg.num_heads, cfg.head_dim, cfg.num_kv_heads, cfg.head_dim**-0.5, None)
            for _ in range(cfg.num_layers if self.kind == "eagle" else 1)
        ]
        head = EagleHead(cfg, attns, runner.dtype, mc.max_model_len)
        head.load(read_head_weights(path))
        self.head = head.to(runner.device)
        target_embed: Any = getattr(getattr(runner.model, "model", None), "embed_tokens", None)
        self._embed: Any = head.embed_tokens if head.embed_tokens is not None else target_embed
        if self._embed is None:
            raise ValueError(
                f"speculative_config: {self.config.model!r} has no embed_tokens and the target exposes none"
            )
        if self.kind == "eagle3":
            for index in cfg.aux_layers:
                layers[index].register_forward_pre_hook(self._capture(index))

    def _capture(self, index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            hidden, residual = args[0], args[1]
            self._aux[index] = hidden if residual is None else hidden + residual

        return hook

    def weight_bytes(self) -> int:
        if self.head is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.head.parameters()) + self.kv_block_bytes(
            self.runner.block_size
        ) * (self.runner.config.max_num_seqs * self.num_scratch_blocks)

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        assert self.head is not None and self.runner.attn_backend is not None
        cfg = self.head.cfg
        return self.runner.attn_backend.kv_cache_shape(
            num_blocks, self.runner.block_size, cfg.num_kv_heads, cfg.head_dim
        )

    def kv_block_bytes(self, block_size: int) -> int:
        if self.head is None:
            return 0
        return int(np.prod(self._cache_shape(1))) * self.runner.dtype.itemsize * len(self.head.layers)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        assert self.head is not None
        self.num_pool_blocks = num_blocks
        total = num_blocks + self.runner.config.max_num_seqs * self.num_scratch_blocks
        shape = self._cache_shape(total)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.runner.dtype, device=self.runner.device) for _ in self.head.layers
        ]

    # -- drafting -------------------------------------------------------------------------
    def _features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The step's per-row features: the final hidden states, or EAGLE-3's three streams."""
        if self.kind != "eagle3":
            return hidden
        assert self.head is not None
        return torch.cat([self._aux[i][: hidden.shape[0]] for i in self.head.cfg.aux_layers], dim=-1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Target-vocabulary float32 logits of the head's hidden states [n, H]."""
        head, runner = self.head, self.runner
        assert head is not None and runner.model is not None
        if head.norm is not None:
            x = head.norm(x)  # type: ignore[assignment]
        if head.lm_head is None:
            return runner.model.compute_logits(x)  # type: ignore[operator, no-any-return]
        draft = head.lm_head(x).float()  # [n, draft vocab]
        out = draft.new_full((x.shape[0], self.vocab_size), float("-inf"))
        ids = torch.arange(draft.shape[1], device=draft.device) + head.d2t
        return out.index_copy_(1, ids, draft)

    def _run(
        self, steps: list[ScheduledRequest], tables: Any, rows: np.ndarray, features: torch.Tensor
    ) -> tuple[torch.Tensor, StepLayout, torch.Tensor]:
        assert self.head is not None
        layout = StepLayout.build(steps, tables, rows, self.runner.block_size)
        inputs = self.runner.prepare_inputs(layout)
        return (
            inputs.input_ids,
            layout,
            self.head(self._embed(inputs.input_ids), features, inputs.positions, self.kv_caches, inputs.metadata),
        )

    @torch.inference_mode()
    def propose(self, layout: StepLayout, hidden: torch.Tensor, sampled: dict[str, list[int]]) -> dict[str, list[int]]:
        self._probs = {}
        if self.head is None or not self.kv_caches or not self.num_pool_blocks:
            return {}  # a runner-internal step before the caches exist (profiling)
        features = self._features(hidden)
        steps: list[ScheduledRequest] = []
        owners: list[int] = []
        params = []
        last_pos: list[int] = []
        index: list[int] = []  # feature row per head row: < T from this step, >= T a kept one
        kept: list[torch.Tensor] = []
        waiting: dict[str, int] = {}
        qsl = layout.query_start_loc.tolist()
        t = features.shape[0]
        for i, req in enumerate(layout.scheduled):
            if req.pooling_params is not None:
                continue
            rid, start, q0 = req.request_id, req.start_pos, qsl[i]
            new = sampled.get(rid) if req.sample else None
            if new:
                known = len(req.token_ids) - len(req.draft_token_ids) + len(new) - 1
                tokens, rows = [*req.token_ids[1:known], new[-1]], list(range(q0, q0 + known))
            else:  # a prefill chunk: its last row needs the next chunk's first token
                n = len(req.token_ids)
                tokens, rows = list(req.token_ids[1:n]), list(range(q0, q0 + n - 1))
                waiting[rid] = q0 + n - 1
            prev = self._pending.pop(rid, None)
            if prev is not None and prev[1] == start - 1:
                tokens, rows, start = [req.token_ids[0], *tokens], [t + len(kept), *rows], start - 1
                kept.append(prev[0])
            if not tokens:
                continue
            steps.append(ScheduledRequest(rid, tokens, start, [], bool(new), _DRAFT_PARAMS))
            owners.append(i)
            index.extend(rows)
            if new:
                params.append(req.sampling_params)
                last_pos.append(start + len(tokens) - 1)
        if len(self._pending) > 4 * self.runner.config.max_num_seqs:
            self._pending.clear()  # requests aborted mid-prefill leave their row behind
        for rid, row in waiting.items():
            self._pending[rid] = (features[row].clone(), int(layout.positions[row]))
        if not steps:
            return {}
        source = torch.cat([features, torch.stack(kept)]) if kept else features
        feats = source.index_select(0, to_device(torch.tensor(index, dtype=torch.int64), source.device))
        tables = self.draft_tables(layout, owners, self.num_pool_blocks)
        rows_all = np.arange(len(steps), dtype=np.int64)
        _, first, out = self._run(steps, tables, rows_all, feats)
        limit = self.config.disable_by_batch_size
        if not params or (limit and len(params) >= limit):
            return {}
        ends = to_device(torch.from_numpy(first.logits_indices), out.device)
        state = {"h": out.index_select(0, ends)}  # [S, H] the head's output at each request's last row
        ids = [s.request_id for s in steps if s.sample]
        draft_rows = rows_all[[s.sample for s in steps]]

        def step(tokens: torch.Tensor, j: int) -> torch.Tensor:
            batch = [
                ScheduledRequest(r, [0], p + j, [], True, _DRAFT_PARAMS) for r, p in zip(ids, last_pos, strict=True)
            ]
            state["h"], logits = self._run_decode(batch, tables, draft_rows, tokens, state["h"])
            return logits

        drafts, probs, is_sampled = self.run_drafts(self._logits(state["h"]), params, step)
        host = drafts.cpu().tolist()
        self.remember(ids, host, probs, is_sampled)
        return dict(zip(ids, host, strict=True))

    def _run_decode(
        self, batch: list[ScheduledRequest], tables: Any, rows: np.ndarray, tokens: torch.Tensor, prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [S, H], logits [S, vocab]) after feeding one draft token per request: through the
        runner's step buffers, so a runner with CUDA graphs pads it to a decode size and replays."""
        runner, n = self.runner, len(batch)
        inputs = runner.prepare_inputs(runner.build_layout(batch, tables, rows))
        inputs.input_ids[:n] = tokens
        padded = inputs.input_ids.shape[0]
        if padded != n:  # the padding rows' states are never read
            prev = torch.cat([prev, prev.new_zeros(padded - n, prev.shape[1])])
        hidden, logits = runner.run_draft_decode(inputs, prev)
        return hidden[:n], logits[:n]

    def decode_pass(
        self, input_ids: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, metadata: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.head is not None
        hidden = self.head(self._embed(input_ids), prev, positions, self.kv_caches, metadata)
        return hidden, self._logits(hidden)

    def shutdown(self) -> None:
        self.head = None
        self.kv_caches = []
        self._aux = {}
