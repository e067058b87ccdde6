"""ParallelLlama in plain PyTorch, with no kvik code: the reference the plugin's tests compare against.

Full causal attention recomputed over the whole sequence (no cache), float32.
"""

from __future__ import annotations

from typing import Any

import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, d] rotated "rotate_half" style (the first and second halves pair up)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)  # [d/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, d/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_logits(weights: dict[str, torch.Tensor], config: dict[str, Any], token_ids: list[int]) -> torch.Tensor:
    """[T] token ids -> [T, vocab] float32 logits of ParallelLlama."""
    w = {k: v.float() for k, v in weights.items()}
    eps, theta = config["rms_norm_eps"], config.get("rope_theta", 10000.0)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    ids = torch.tensor(token_ids)
    positions = torch.arange(len(token_ids))
    t = len(token_ids)
    x = w["model.embed_tokens.weight"][ids]  # [T, hidden]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = _rope((h @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, head_dim), positions, theta)
        k = _rope((h @ w[p + "self_attn.k_proj.weight"].T).view(t, kv_heads, head_dim), positions, theta)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, kv_heads, head_dim)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # GQA: query head j reads kv head j // group
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(t, heads * head_dim)
        attn = attn @ w[p + "self_attn.o_proj.weight"].T
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        mlp = (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = x + attn + mlp  # the parallel block
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def reference_greedy(
    weights: dict[str, torch.Tensor], config: dict[str, Any], prompt: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of ``prompt`` (argmax at each step, recomputing the whole sequence)."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(reference_logits(weights, config, tokens)[-1].argmax()))
    return tokens[len(prompt) :]
