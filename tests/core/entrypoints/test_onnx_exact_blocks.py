"""kvik.entrypoints.onnx_exact_blocks: which weights feed which builder node, and the shared zero point."""

from __future__ import annotations

import numpy as np
from kvik.entrypoints.onnx_exact_blocks import AffineBlocks, source_names


def test_builder_weights_map_to_their_sources() -> None:
    assert source_names("model.layers.3.attn.qkv_proj.MatMul.weight_Q4") == tuple(
        f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"
    )
    assert source_names("model.layers.0.mlp.down_proj.MatMul.weight_Q4") == ("model.layers.0.mlp.down_proj.weight",)
    assert source_names("lm_head.MatMul.weight_Q4") == ("lm_head.weight",)
    assert source_names("model.embed_tokens.weight") is None


def test_a_zero_point_only_when_every_block_has_it_exactly() -> None:
    scales = np.array([[0.5, 0.25]], np.float32)
    codes = np.zeros((1, 64), np.uint8)
    assert AffineBlocks(4, codes, scales, -8 * scales).zero_point() == 8
    assert AffineBlocks(8, codes, scales, -128 * scales).zero_point() == 128
    assert AffineBlocks(4, codes, scales, 0 * scales).zero_point() == 0
    assert AffineBlocks(4, codes, scales, np.array([[-4.0, -2.0]], np.float32)).zero_point() == 8
    assert AffineBlocks(4, codes, scales, np.array([[-4.0, -1.9]], np.float32)).zero_point() is None
