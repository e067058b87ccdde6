"""Logprobs of sampled and prompt tokens, gathered on the torch device and fetched in one copy.

Semantics (vLLM's default ``logprobs_mode="raw_logprobs"``): log-probabilities
of the raw model distribution, ``log_softmax(logits)`` *before* any logits
processor, grammar mask, penalty, temperature or top-k/top-p filter. Each
entry holds the chosen (or next prompt) token plus the row's top ``k``; the
chosen token's rank is 1 + the number of tokens strictly more likely (ties
share the better rank). The host side (arrays -> RunnerOutput) is the kit's
:func:`kvik.worker.kit.logprobs.assemble_output`, shared with non-torch runners.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kvik.sample.batch import PromptRows
from kvik.scheduling.output import RunnerOutput, ScheduledRequest
from kvik.tensor_transfer import start_to_host, to_device
from kvik.worker.kit.logprobs import TopLogprobs, assemble_output


def gather_logprobs(
    logprobs: torch.Tensor, targets: torch.Tensor, k: int, stable_ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs [n, vocab] (log_softmax of the logits), targets [n] -> (ids [n, 1 + k], logprobs [n, 1 + k],
    target ranks [n]).

    Column 0 is the target token, columns 1.. the top ``k`` in order. ``stable_ties`` (deterministic
    mode): equal logprobs (common with 16-bit logits) in token-id order, whatever the batch; ``topk``
    may pick another of several tied tokens depending on how many rows it is given.
    """
    target_lp = logprobs.gather(1, targets[:, None])  # [n, 1]
    ranks = (logprobs > target_lp).sum(dim=-1) + 1
    ids, lps = targets[:, None], target_lp
    if k > 0:
        if stable_ties:
            top_lp, top_ids = logprobs.sort(dim=-1, descending=True, stable=True)
            top_lp, top_ids = top_lp[:, :k], top_ids[:, :k]
        else:
            top_lp, top_ids = logprobs.topk(k, dim=-1)
        ids, lps = torch.cat([ids, top_ids], dim=1), torch.cat([lps, top_lp], dim=1)
    return ids, lps, ranks


class _Transfer:
    """Packs int32 tensors (float32 ones bit-cast) into one buffer for a single device->host copy."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.shapes: list[tuple[int, ...]] = []

    def add(self, tensor: torch.Tensor) -> int:
        if tensor.dtype == torch.float32:
            tensor = tensor.contiguous().view(torch.int32)
        self.parts.append(tensor.to(torch.int32).flatten())
        self.shapes.append(tuple(tensor.shape))
        return len(self.parts) - 1

    def start(self) -> Callable[[], list[np.ndarray]]:
        """Start the step's one device->host copy; the returned callable waits for it and unpacks.

        On CUDA the copy goes to pinned memory behind an event, so waiting for it
        does not wait for work queued after it (the next step, under async scheduling).
        """
        copied = start_to_host(torch.cat(self.parts))
        return lambda: self._unpack(copied().numpy())

    def _unpack(self, host: np.ndarray) -> list[np.ndarray]:
        out, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            out.append(host[offset : offset + size].reshape(shape))
            offset += size
        return out


def start_sample_output(
    sampled: torch.Tensor,
    raw_logprobs: torch.Tensor | None,
    reqs: list[ScheduledRequest],
    prompt_logits: torch.Tensor | None,
    prompt_rows: list[PromptRows],
    scheduled: list[ScheduledRequest],
    stable_ties: bool = False,
) -> Callable[[], RunnerOutput]:
    """Start copying a step's results to the host; the callable waits and assembles its RunnerOutput.

    Sampled tokens, sample and prompt logprobs travel in one copy.

    ``sampled`` [n] are the tokens of ``reqs``; ``raw_logprobs`` [n, vocab] the
    log_softmax of their logits taken before any processor edited them (None
    when no row asked for logprobs); ``prompt_logits`` [sum of rows, vocab] the
    logits of ``prompt_rows`` in order. ``stable_ties``: see :func:`gather_logprobs`.
    """
    transfer = _Transfer()
    tokens_at = transfer.add(sampled)
    sample_at = None
    if raw_logprobs is not None:
        ks = [r.sampling_params.logprobs for r in reqs]
        k = min(max(x or 0 for x in ks), raw_logprobs.shape[-1])
        ids, lps, ranks = gather_logprobs(raw_logprobs, sampled, k, stable_ties)
        sample_at = (transfer.add(ids), transfer.add(lps), transfer.add(ranks))
    prompt_at = None
    if prompt_rows and prompt_logits is not None:
        targets = [t for pr in prompt_rows for t in pr.targets]
        target_t = to_device(torch.tensor(targets, dtype=torch.int64), prompt_logits.device)
        pk = max(scheduled[pr.index].sampling_params.prompt_logprobs or 0 for pr in prompt_rows)
        prompt_lp = torch.log_softmax(prompt_logits.float(), dim=-1)
        ids, lps, ranks = gather_logprobs(prompt_lp, target_t, min(pk, prompt_logits.shape[-1]), stable_ties)
        prompt_at = (transfer.add(ids), transfer.add(lps), transfer.add(ranks))
    wait = transfer.start()

    def finish() -> RunnerOutput:
        host = wait()

        def top(at: tuple[int, int, int] | None) -> TopLogprobs | None:
            return None if at is None else TopLogprobs(host[at[0]], host[at[1]].view(np.float32), host[at[2]])

        return assemble_output(reqs, host[tokens_at], top(sample_at), scheduled, prompt_rows, top(prompt_at))

    return finish
