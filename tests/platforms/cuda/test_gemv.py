"""The one-row dense GEMV (kvik_cuda.gemv) and the fused Linear / LMHead that use it, against float64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kvik_cuda.gemv import WIDE_CONFIG, DenseGemvConfig, config_for, dense_gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("k", "n", "dtype", "config"),
    [
        (512, 40, torch.float16, DenseGemvConfig(block_n=8, per_sm=8)),  # split K, ragged last row block
        (300, 33, torch.bfloat16, DenseGemvConfig(block_n=4, per_sm=2)),  # K not a multiple of the step
        (1024, 64, torch.float16, DenseGemvConfig(block_n=16, block_k=512, num_warps=2)),
        (256, 7, torch.float32, DenseGemvConfig(block_n=2, per_sm=1)),  # no split: stored directly
        (1280, 24, torch.bfloat16, DenseGemvConfig(block_n=2, per_sm=1, unroll=4)),  # splits of 2, 2, 1, 0 steps
        (1280, 24, torch.bfloat16, DenseGemvConfig(block_n=2, per_sm=1 << 20, unroll=4)),  # one step per split
        (2560, 24, torch.bfloat16, DenseGemvConfig(block_n=2, per_sm=0, unroll=4)),  # no split: 10 steps by 4
        (2560, 24, torch.float16, WIDE_CONFIG),  # one row a program, 8 steps in flight (wide weights' default)
        (2560, 24, torch.bfloat16, DenseGemvConfig(block_n=1, per_sm=0, unroll=8)),  # no split: 10 steps by 8
    ],
)
def test_matches_float64_and_is_deterministic(k: int, n: int, dtype: torch.dtype, config: DenseGemvConfig) -> None:
    from kvik_cuda import gemv

    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    want = x.double() @ w.double().T
    got = dense_gemv(x, w, config)
    assert got.shape == (1, n) and got.dtype == dtype
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}[dtype]
    assert float((got.double() - want).abs().max()) <= ulp * float(want.abs().max())
    assert torch.equal(dense_gemv(x, w, config), got)  # partials added in split order
    assert int(gemv.completion_counters(x.device, 1).abs().sum()) == 0  # counters back at zero for the next call


def test_fused_linear_and_head_use_it_for_one_row_only() -> None:
    from kvik.layers.embedding import LMHead
    from kvik.layers.linear import Linear
    from kvik_cuda.fused import FusedLinear, FusedLMHead, fuse_layers

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "proj": Linear(64, [24, 8], dtype=torch.float16, device=DEVICE),
        "biased": Linear(64, 32, bias=True, dtype=torch.float16, device=DEVICE),
        "head": LMHead(48, 64, dtype=torch.float16, device=DEVICE),
    })  # fmt: skip
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    one, two = torch.randn(1, 64).to(DEVICE, torch.float16), torch.randn(2, 64).to(DEVICE, torch.float16)
    before = {name: (m(one), m(two)) for name, m in model.items()}
    counts = fuse_layers(model)
    assert counts == {"FusedLinear": 2, "FusedLMHead": 1}
    assert isinstance(model["proj"], FusedLinear) and isinstance(model["head"], FusedLMHead)
    for name, m in model.items():
        got_one, got_two = m(one), m(two)
        assert torch.equal(got_two, before[name][1])  # several rows: cuBLAS / torch as before
        if name == "biased":
            assert torch.equal(got_one, before[name][0])  # a bias: not the GEMV
        else:
            torch.testing.assert_close(got_one.float(), before[name][0].float(), rtol=2e-3, atol=2e-3)
    assert model["head"](one).dtype == torch.float32


@pytest.mark.parametrize("k", [768, 1280, 4096])
def test_any_unroll_gives_the_same_bits(k: int) -> None:
    """Unrolled steps keep each lane's k order, so unroll is a speed knob only (batch-1 tokens do not move)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(40, k, generator=g).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
    for per_sm in (0, 1, 1 << 20):  # no split, some, one step per split
        plain = dense_gemv(x, w, DenseGemvConfig(per_sm=per_sm, unroll=1))
        for unroll in (2, 4, 8):
            assert torch.equal(dense_gemv(x, w, DenseGemvConfig(per_sm=per_sm, unroll=unroll)), plain)


def test_wide_weights_take_the_one_row_config() -> None:
    """No more rows than columns (an o or down projection): WIDE_CONFIG; taller weights: the default."""
    assert config_for(2048, 4096) == config_for(4096, 4096) == WIDE_CONFIG
    assert config_for(5120, 2048) == DenseGemvConfig()
    g = torch.Generator().manual_seed(1)
    for n, k in ((24, 512), (40, 32)):
        w = torch.randn(n, k, generator=g).to(DEVICE, torch.bfloat16)
        x = torch.randn(1, k, generator=g).to(DEVICE, torch.bfloat16)
        assert torch.equal(dense_gemv(x, w), dense_gemv(x, w, config_for(n, k)))


@pytest.mark.parametrize(
    ("k", "inter", "dtype", "config"),
    [
        (512, 20, torch.float16, DenseGemvConfig(block_n=8, per_sm=8)),  # split K, ragged last row block
        (300, 33, torch.float32, DenseGemvConfig(block_n=4, per_sm=2)),  # odd rows: 17 plain blocks, 9 gated
        (1280, 24, torch.bfloat16, DenseGemvConfig(block_n=2, per_sm=1, unroll=4)),
        (2560, 24, torch.bfloat16, DenseGemvConfig(block_n=2, per_sm=0, unroll=4)),  # no split
    ],
)
def test_gated_gives_the_bits_of_the_projection_then_silu_and_mul(
    k: int, inter: int, dtype: torch.dtype, config: DenseGemvConfig
) -> None:
    """``gated`` computes a gate row and its up row in one program and applies SiLU there: the same bits as the
    plain GEMV over all 2I rows followed by FusedSiluAndMul (the same split, the same k order per row)."""
    from kvik_cuda import gemv
    from kvik_cuda.fused import FusedSiluAndMul

    g = torch.Generator().manual_seed(k + inter)
    w = torch.randn(2 * inter, k, generator=g).to(DEVICE, dtype)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    want = FusedSiluAndMul()(dense_gemv(x, w, config))
    got = dense_gemv(x, w, config, gated=True)
    assert got.shape == (1, inter) and got.dtype == dtype
    assert torch.equal(got, want)
    assert int(gemv.completion_counters(x.device, 1).abs().sum()) == 0


def test_fused_llama_mlp_gates_inside_the_gemv_at_one_row_only() -> None:
    """FusedLlamaMLP: one row through the gated GEMV (the eager MLP's result to rounding, the unfused GEMV +
    SiLU kernel's bits); several rows, another activation or a biased projection as before."""
    from types import SimpleNamespace

    from kvik.layers.activation import GeluTanhAndMul
    from kvik.models.interface import ModelBuildContext
    from kvik.models.llama import LlamaMLP
    from kvik_cuda import fused
    from kvik_cuda.fused import FusedLlamaMLP, fuse_layers

    hf_config = SimpleNamespace(hidden_size=64, intermediate_size=40)  # all an MLP reads of the model config
    ctx = ModelBuildContext(SimpleNamespace(hf_config=hf_config), torch.float16, torch.device(DEVICE), lambda *a: None)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "silu": LlamaMLP(ctx, False), "gelu": LlamaMLP(ctx, False, act=GeluTanhAndMul()), "biased": LlamaMLP(ctx, True),
    })  # fmt: skip
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    one, two = torch.randn(1, 64).to(DEVICE, torch.float16), torch.randn(2, 64).to(DEVICE, torch.float16)
    eager = {name: (m(one), m(two)) for name, m in model.items()}
    fuse_layers(model)
    assert all(type(m) is FusedLlamaMLP for m in model.values())
    mlp = model["silu"]
    unfused = mlp.down_proj(fused.FusedSiluAndMul()(mlp.gate_up_proj(one)))  # GEMV, SiLU kernel, GEMV
    calls = []
    gemv_fn = fused.dense_gemv
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "dense_gemv", lambda *a, **kw: calls.append(kw.get("gated", False)) or gemv_fn(*a, **kw))
        for name, m in model.items():
            calls.clear()
            got_one = m(one)
            assert (True in calls) is (name == "silu"), name
            torch.testing.assert_close(got_one, eager[name][0], rtol=5e-3, atol=5e-3)
            calls.clear()
            torch.testing.assert_close(m(two), eager[name][1], rtol=5e-3, atol=5e-3)
            assert True not in calls  # two rows: not the gated GEMV
    assert torch.equal(mlp(one), unfused)
