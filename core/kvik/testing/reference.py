"""Reference results from HF transformers, and random prompts, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(
    model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, device: str = "cpu"
) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt (float32, EOS disabled) on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
            outs.append(out[0, len(prompt) :].tolist())
    return outs


def random_prompts(n: int, seed: int = 0, low: int = 3, high: int = 60, vocab: int = 500) -> list[list[int]]:
    """``n`` prompts of random token ids in [3, vocab) with lengths in [low, high)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]
