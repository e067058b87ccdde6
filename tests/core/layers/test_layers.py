"""Rotary settings and frequencies, RMSNorm and SiLU-and-mul against Hugging Face's implementations."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.activation import SiluAndMul
from kvik.layers.norm import RMSNorm
from kvik.layers.rotary import (
    RotaryEmbedding,
    compute_inv_freq,
    rope_attention_factor,
    rope_max_len,
    rope_settings,
)
from kvik.testing.tiny_models import tiny_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        LLAMA3,
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ],
)
def test_inv_freq_matches_hf(scaling: dict | None) -> None:
    config = tiny_config("llama", rope_scaling=scaling, rope_theta=50000.0, hidden_size=128)
    rope = rope_settings(config)
    assert rope.theta == 50000.0
    ours = compute_inv_freq(rope, 32, config.max_position_embeddings, config.max_position_embeddings)
    if scaling is None:
        expected = 1.0 / (50000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32))
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
        assert rope_attention_factor(rope, config.max_position_embeddings) == pytest.approx(attention_factor)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


def test_dynamic_rope_beyond_the_trained_length_uses_hf_scaled_base() -> None:
    config = tiny_config("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours = compute_inv_freq(rope_settings(config), 16, 512, max_model_len=1000)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=1000)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
    assert rope_max_len(config) == 1024


def test_old_style_config_attributes() -> None:
    # transformers < 5: rope_theta and rope_scaling ({"type": ...}) as plain attributes
    old = types.SimpleNamespace(
        rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=100
    )
    rope = rope_settings(old)
    assert (rope.rope_type, rope.theta, rope.params["factor"]) == ("linear", 500000.0, 2.0)
    assert rope_max_len(old) == 200
    plain = rope_settings(types.SimpleNamespace(rope_theta=1e6, rope_scaling=None))
    assert (plain.rope_type, plain.theta) == ("default", 1e6)


def test_unsupported_rope_type_is_a_clear_error() -> None:
    # ("su" was the example once; it is LongRoPE's old name and supported now.)
    with pytest.raises(ValueError, match=r"rope type 'mrope' .* supported: default, linear, llama3, dynamic, yarn"):
        rope_settings(types.SimpleNamespace(rope_scaling={"type": "mrope"}))


def test_rotary_matches_hf_apply_rotary_pos_emb() -> None:
    config = tiny_config("llama", rope_scaling=LLAMA3)
    rotary = RotaryEmbedding(16, rope_settings(config), 512)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 511])
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    ours_q, ours_k = rotary(q, k, rotary.cos_sin(positions, torch.float32))
    freqs = positions.float()[:, None] * rotary.inv_freq[None]
    emb = torch.cat((freqs, freqs), -1)[None]  # [1, n, D]
    # HF layout: [batch, heads, seq, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos(), emb.sin())
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1))


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    head_dim=st.sampled_from([8, 16, 64]),
    partial=st.sampled_from([1.0, 0.5]),
    n=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_rotary_is_bitwise_hfs_formula(dtype: torch.dtype, head_dim: int, partial: float, n: int, seed: int) -> None:
    """The roll-and-signed-sin rotation gives exactly the bits of HF's ``x * cos + rotate_half(x) * sin`` in
    every dtype, partial rotary included (the rest of the head passes through)."""
    from transformers.models.llama.modeling_llama import rotate_half

    config = tiny_config("llama", partial_rotary_factor=partial)
    rotary = RotaryEmbedding(head_dim, rope_settings(config), 4096)
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, 3, head_dim, generator=gen) * 4).to(dtype)
    k = (torch.randn(n, 1, head_dim, generator=gen) * 4).to(dtype)
    cos, sin = rotary.cos_sin(torch.randint(0, 4096, (n,), generator=gen), dtype)
    got_q, got_k = rotary(q, k, (cos, sin))
    r = rotary.rotary_dim
    for x, got in ((q, got_q), (k, got_k)):
        want = torch.cat((x[..., :r] * cos + rotate_half(x[..., :r]) * sin, x[..., r:]), dim=-1)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf_and_fuses_the_residual(dtype: torch.dtype) -> None:
    ours = RMSNorm(64, eps=1e-5, dtype=dtype)
    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    weight = torch.randn(64).to(dtype)
    ours.weight.data.copy_(weight)
    hf.weight.data.copy_(weight)
    x, residual = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    torch.testing.assert_close(ours(x), hf(x), atol=0, rtol=0)
    normed, summed = ours(x, residual)
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, hf(x + residual), atol=0, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    hidden=st.integers(1, 700),
    rows=st.integers(1, 4),
    log_scale=st.integers(-4, 4),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_16_bit_is_bitwise_hf(hidden: int, rows: int, log_scale: int, dtype: torch.dtype, seed: int) -> None:
    """The CPU's one-call normalisation (F.rms_norm without a weight) rounds exactly as HF's written-out steps."""
    g = torch.Generator().manual_seed(seed)
    ours, hf = RMSNorm(hidden, eps=1e-6, dtype=dtype), LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    weight = (torch.randn(hidden, generator=g) * 0.2 + 1).to(dtype)
    ours.weight.data.copy_(weight)
    hf.weight.data.copy_(weight)
    x = (torch.randn(rows, hidden, generator=g) * 10.0**log_scale).to(dtype)
    assert torch.equal(ours(x), hf(x))


def test_silu_and_mul() -> None:
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_yarn_extends_the_usable_context() -> None:
    config = tiny_config(
        "qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    )
    assert rope_max_len(config) == 2048
