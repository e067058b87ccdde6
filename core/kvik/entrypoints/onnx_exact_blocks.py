"""A quantized source's own blocks written into an int4/int8 ONNX export, in place of the builder's re-quantization.

ONNX Runtime GenAI's builder quantizes dense float weights; from a GGUF it gets the dequantized values and
rounds them onto a new grid. For SmolLM2's Q4_1 file that moved the greedy text at the first token (a haiku
became a repetition loop), and the tied Q8_0 head became 4-bit. Many GGUF block types are, exactly,
``w = scale * code + min`` over blocks of 32 weights with one scale and one minimum per block (Q4_0, Q4_1,
Q8_0): this module writes those blocks into the builder's ``MatMulNBits`` nodes unchanged.

``MatMulNBits`` computes ``w = scale * (code - zero_point)`` with an integer zero point, and ONNX Runtime's
fast CPU kernels need it stored as packed unsigned integers (float zero points take a path ~20x slower).
So a block whose minimum is a whole number of steps below zero (Q4_0: ``-8 scale``; Q8_0 shifted to
unsigned: ``-128 scale``) keeps its minimum as that zero point; otherwise (Q4_1) the zero point is 0 and the
minimums are added after the product: ``y += blocksum(x) @ mins^T``, where ``blocksum`` sums each run of 32
inputs (a ReduceSum and a ``[K/32, N]`` MatMul, a few percent of the weight's bytes). 8-bit blocks turn
the node into an 8-bit ``MatMulNBits``.

Sources hand their blocks over through :class:`AffineBlocks` (``value.affine_blocks()`` on what
``iter_weights(quantized=True)`` yields); a weight without them keeps the builder's re-quantization.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32  # weights per block: the builder's block_size for quantized sources, and GGUF's


@dataclass(frozen=True)
class AffineBlocks:
    """A weight ``[N, K]`` as ``scales * codes + mins`` over blocks of :data:`BLOCK` along K, exactly."""

    bits: int  # 4 or 8
    codes: np.ndarray  # [N, K] uint8, 0 .. 2**bits - 1
    scales: np.ndarray  # [N, K // BLOCK] float32
    mins: np.ndarray  # [N, K // BLOCK] float32

    def zero_point(self) -> int | None:
        """The integer zero point every block shares exactly (``mins == -zp * scales``), or None."""
        for zp in (1 << (self.bits - 1), 0):
            if np.array_equal(self.mins, np.float32(-zp) * self.scales):
                return zp
        return None


# The builder's MatMulNBits weights, by name, and the Hugging Face weights each holds (rows concatenated).
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(attn\.qkv_proj|attn\.o_proj|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)"
                    r"\.MatMul\.weight_Q4$")  # fmt: skip
_SOURCES = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj",),
    "mlp.up_proj": ("mlp.up_proj",),
    "mlp.down_proj": ("mlp.down_proj",),
}


def source_names(onnx_weight: str) -> tuple[str, ...] | None:
    """The Hugging Face weights behind one of the builder's ``MatMulNBits`` weights, or None if unknown."""
    if onnx_weight == "lm_head.MatMul.weight_Q4":
        return ("lm_head.weight",)
    match = _LAYER.match(onnx_weight)
    if match is None:
        return None
    layer, part = match.groups()
    return tuple(f"model.layers.{layer}.{name}.weight" for name in _SOURCES[part])


def pack(blocks: AffineBlocks, zero_point: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulNBits``' B ``[N, K/32, 32 * bits / 8]``, scales ``[N, K/32]`` and packed zero points."""
    n, k = blocks.codes.shape
    nblocks = k // BLOCK
    codes = blocks.codes.reshape(n, nblocks, BLOCK)
    if blocks.bits == 8:
        return codes.copy(), blocks.scales, np.full((n, nblocks), zero_point, np.uint8)
    b = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # element 2i low nibble, 2i + 1 high
    zp = np.full((n, (nblocks + 1) // 2), zero_point | (zero_point << 4), np.uint8)
    if nblocks % 2:
        zp[:, -1] &= 0x0F  # the padding nibble of an odd block count
    return b, blocks.scales, zp


def carry_blocks(folder: Path, weights: Iterable[tuple[str, Any]]) -> list[str]:
    """Rewrite ``folder/model.onnx``'s ``MatMulNBits`` weights from ``weights`` (``iter_weights(quantized=True)``)
    wherever every source weight of a node has :class:`AffineBlocks`; returns notes on what was carried."""
    import onnx
    from onnx import helper, numpy_helper

    path = folder / "model.onnx"
    model = onnx.load(str(path))  # with its external data
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    nodes = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "MatMulNBits" and source_names(n.input[1])]
    wanted = {name for _, n in nodes for name in source_names(n.input[1]) or ()}
    # The weights as the source hands them over (GGUF: its raw blocks), decoded one node at a time: all of a
    # large model's codes unpacked at once would take a byte per weight.
    found = {name: value for name, value in weights if name in wanted and hasattr(value, "affine_blocks")}
    carried: dict[int, int] = {}
    added: list[tuple[int, list[Any]]] = []  # (after the node at this index, new nodes)
    block_sums: dict[str, str] = {}  # input -> its block sums (gate and up share theirs)
    for index, node in nodes:
        names = source_names(node.input[1]) or ()
        parts = [found[name].affine_blocks() if name in found else None for name in names]
        if not parts or any(p is None for p in parts) or len({p.bits for p in parts}) != 1:  # type: ignore[union-attr]
            continue
        blocks = AffineBlocks(
            parts[0].bits,  # type: ignore[union-attr]
            np.concatenate([p.codes for p in parts]),  # type: ignore[union-attr]
            np.concatenate([p.scales for p in parts]),  # type: ignore[union-attr]
            np.concatenate([p.mins for p in parts]),  # type: ignore[union-attr]
        )
        attrs = {a.name: a for a in node.attribute}
        n, k = blocks.codes.shape
        if (helper.get_attribute_value(attrs["N"]), helper.get_attribute_value(attrs["K"])) != (n, k):
            continue  # not the shape the builder wrote: leave its weights
        zero_point = blocks.zero_point()
        b, scales, zp = pack(blocks, 0 if zero_point is None else zero_point)
        for name, array in zip(node.input[1:4], (b, scales, zp), strict=True):
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        attrs["bits"].i = blocks.bits
        carried[blocks.bits] = carried.get(blocks.bits, 0) + 1
        if zero_point is None:
            added.append((index, _add_mins(node, blocks.mins, graph, k, block_sums)))
    # After their node, so the graph stays in topological order; from the end, so earlier indices hold.
    for index, extra in reversed(added):
        for offset, new in enumerate(extra):
            graph.node.insert(index + 1 + offset, new)
    # Everything is in memory now; onnx appends to an existing data file, which would keep the replaced weights.
    (folder / "model.onnx.data").unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)  # fmt: skip
    notes = [
        f"{count} MatMulNBits weights carry the source's {bits}-bit blocks exactly" for bits, count in carried.items()
    ]
    if carried and sum(carried.values()) < len(nodes):
        notes.append(f"{len(nodes) - sum(carried.values())} MatMulNBits weights keep the builder's re-quantization "
                     "(their source blocks are not block-32 affine): close to the source, not bit-exact")  # fmt: skip
    return notes


def _add_mins(node: Any, mins: np.ndarray, graph: Any, k: int, block_sums: dict[str, str]) -> list[Any]:
    """Nodes adding ``blocksum(x) @ mins^T`` to ``node``'s output (its consumers read the sum); an input's block
    sums are computed once, by the first node that needs them."""
    from onnx import helper, numpy_helper

    base = node.name.replace("/", "_").strip("_")
    product, minima = f"{base}_product", f"{base}_mins"
    out, x = node.output[0], node.input[0]
    node.output[0] = product
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(mins.T, dtype=np.float32), minima))
    new = []
    sums = block_sums.get(x)
    if sums is None:
        sums = block_sums[x] = f"{base}_blocksum"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64), f"{base}_blocks_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{base}_last_axis"),
        ])  # fmt: skip
        new += [
            helper.make_node("Reshape", [x, f"{base}_blocks_shape"], [f"{base}_blocks"], name=f"{node.name}/blocks"),
            helper.make_node(
                "ReduceSum", [f"{base}_blocks", f"{base}_last_axis"], [sums], name=f"{node.name}/blocksum", keepdims=0
            ),
        ]
    return [
        *new,
        helper.make_node("MatMul", [sums, minima], [f"{base}_min_term"], name=f"{node.name}/mins"),
        helper.make_node("Add", [product, f"{base}_min_term"], [out], name=f"{node.name}/add_mins"),
    ]
