"""INT4 weight-only: each checkpoint packing loads into kvik's layout and multiplies like its dequantized weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.layers.linear import Linear
from kvik.testing.conformance.quantization import check_quantization_method
from kvik_quant import int4_pack as pack
from kvik_quant.compressed_tensors import CompressedTensorsMethod
from kvik_quant.int4 import AWQLinearMethod, GPTQLinearMethod, Int4OnlineMethod, rtn_quantize

SHAPES = [(128, [64]), (128, [64, 32, 32]), (256, [64, 64])]
# INT4 of N(0, 1/K) weights: a relative Frobenius error of ~0.1 (asymmetric) to ~0.15 (symmetric per group).
MAX_WEIGHT_ERROR = 0.2


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), words=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_packings_round_trip(rows: int, words: int, seed: int) -> None:
    codes = torch.randint(0, 16, (rows, 8 * words), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(pack.unpack_last(pack.pack_last(codes)), codes)
    assert torch.equal(pack.unpack_awq(pack.pack_awq(codes)), codes)
    assert torch.equal(pack.unpack_rows(pack.pack_rows(codes.t().contiguous())), codes.t())


def test_packings_match_the_tools_bit_for_bit() -> None:
    """compressed-tensors' own packer (signed codes + 8) and AWQ's interleaving, on known words."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_to_int32((codes - 8).to(torch.int8), 4), pack.pack_last(codes))
    assert torch.equal(pack_to_int32((codes - 8).to(torch.int8), 4, packed_dim=0), pack.pack_rows(codes))
    # AutoAWQ: columns 0..7 = 0..7 land in nibbles (0, 2, 4, 6, 1, 3, 5, 7) -> word 0x75316420.
    assert int(pack.pack_awq(torch.arange(8).reshape(1, 8))) == 0x75316420


@pytest.mark.parametrize(
    ("method_cls", "config"),
    [
        (GPTQLinearMethod, {"quant_method": "gptq", "bits": 4, "group_size": 128}),
        (GPTQLinearMethod, {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}),
        (GPTQLinearMethod, {"quant_method": "gptq", "bits": 4, "group_size": -1}),
        (AWQLinearMethod, {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}),
        (Int4OnlineMethod, {}),
    ],
    ids=["gptq-g128", "gptq-v2-g32", "gptq-channel", "awq-g64", "online"],
)
def test_conformance(method_cls: type, config: dict) -> None:
    check_quantization_method(method_cls, config, shapes=SHAPES, max_weight_rel_error=MAX_WEIGHT_ERROR)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_pack_quantized_conformance(symmetric: bool) -> None:
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 64}}},
    }  # fmt: skip
    check_quantization_method(CompressedTensorsMethod, config, shapes=SHAPES, max_weight_rel_error=MAX_WEIGHT_ERROR)


def test_gptq_act_order_is_repacked_group_contiguous() -> None:
    """A permuted g_idx (desc_act): kvik permutes rows once and gathers x; results equal the dequantized weight."""
    k, n, g = 128, 48, 32
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)  # input feature perm[i] is in group i // g
    codes_p, scales, zeros = rtn_quantize(dense[:, perm], g, symmetric=True)  # groups of permuted columns
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    method = GPTQLinearMethod(g)
    layer = Linear(k, n, quant_method=method)
    layer.load("qweight", pack.pack_rows(codes.t()))
    layer.load("qzeros", pack.pack_last((zeros - 1).t()))
    layer.load("scales", scales.t().half())
    layer.load("g_idx", g_idx)
    method.process_weights_after_loading(layer)
    assert layer.perm is not None
    expected = (
        codes - zeros.repeat_interleave(g, 1)[:, torch.argsort(perm)]
    ) * scales.half().float().repeat_interleave(g, 1)[:, torch.argsort(perm)]
    torch.testing.assert_close(method.dequantize(layer), expected)
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(layer(x), x @ expected.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"bits": 8, "group_size": 128}, "8-bit"),
        ({"bits": 4, "group_size": 256}, "group_size 256"),
        ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ],
)
def test_unsupported_gptq_configs_are_refused(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTQLinearMethod.from_config({"quant_method": "gptq", **config})


def test_unsupported_awq_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="version 'gemv'"):
        AWQLinearMethod.from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(ValueError, match="groups of 128"):
        Linear(96, 64, quant_method=GPTQLinearMethod(128))
