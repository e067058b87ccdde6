"""LongRoPE (Phi-3), Gemma's norm and GeGLU, per-layer-type rope settings and soft-capping against HF."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.activation import GeluTanhAndMul
from kvik.layers.norm import GemmaRMSNorm
from kvik.layers.rotary import RotaryEmbedding, rope_settings
from kvik.layers.softcap import soft_cap

SHORT = [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
LONG = [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]


def phi3_config(**rope: object) -> transformers.Phi3Config:
    return transformers.Phi3Config(
        vocab_size=64,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        pad_token_id=0,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, **rope},
    )


@pytest.mark.parametrize("seq_len", [40, 300])  # within and beyond original_max_position_embeddings
def test_longrope_cos_sin_match_hf_for_the_served_length(seq_len: int) -> None:
    config = phi3_config()
    hf = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    positions = torch.arange(seq_len)
    want_cos, want_sin = hf(torch.zeros(1, seq_len, 64), positions[None])
    # kvik fixes the factor set by the longest context it serves (HF: by the current sequence).
    ours = RotaryEmbedding(16, rope_settings(config), 1024, max_model_len=seq_len)
    cos, sin = ours.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], want_cos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[:, 0], want_sin[0], atol=1e-5, rtol=1e-5)
    assert ours.attention_factor > 1.0  # 1024 / 64: the paper's sqrt(1 + ln 16 / ln 64)


def test_longrope_factor_list_of_the_wrong_length_is_a_clear_error() -> None:
    config = phi3_config()
    config.rope_parameters["short_factor"] = SHORT[:3]
    with pytest.raises(ValueError, match=r"short_factor has 3 entries.*needs 8"):
        RotaryEmbedding(16, rope_settings(config), 1024, max_model_len=32)


def test_longrope_without_factors_is_a_clear_error() -> None:
    config = phi3_config()
    del config.rope_parameters["long_factor"]
    with pytest.raises(ValueError, match="long_factor"):
        rope_settings(config)


def test_per_layer_type_rope_settings() -> None:
    config = transformers.Gemma3TextConfig(
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        }
    )
    local, full = rope_settings(config, "sliding_attention"), rope_settings(config)
    assert (local.rope_type, local.theta) == ("default", 10.0)
    assert (full.rope_type, full.theta, full.params["factor"]) == ("linear", 1e6, 8.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_matches_hf(dtype: torch.dtype) -> None:
    hf = transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm(48, eps=1e-6)
    ours = GemmaRMSNorm(48, 1e-6, dtype=dtype)
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x = torch.randn(5, 48).to(dtype)
    torch.testing.assert_close(ours(x), hf.to(dtype)(x), atol=0, rtol=0)


def test_gelu_tanh_and_mul_is_gemma_mlp_activation() -> None:
    x = torch.randn(3, 8)
    gate, up = x[:, :4], x[:, 4:]
    want = transformers.activations.ACT2FN["gelu_pytorch_tanh"](gate) * up
    torch.testing.assert_close(GeluTanhAndMul()(x), want)


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(0.5, 100.0))
def test_soft_cap_bounds_and_preserves_order(x: float, cap: float) -> None:
    values = torch.tensor([x, x + 1.0], dtype=torch.float64)
    capped = soft_cap(values, cap)
    assert capped.abs().max() <= cap
    assert capped[0] <= capped[1]
    assert torch.equal(soft_cap(values, None), values)
