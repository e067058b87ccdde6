"""The ggml tensor types kvik-gguf decodes: names and block sizes, without torch.

Reading a GGUF file's config and quantization summary needs only these (the
MLX platform resolves GGUF checkpoints without torch); the decoders live in
:mod:`kvik_gguf.dequant`, which imports torch.
"""

from __future__ import annotations

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPE_SIZES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
FLOAT_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16: stored, not block-quantized


def supported_type_names() -> list[str]:
    return [name for name, *_ in GGML_TYPE_SIZES.values()]


def type_name(ggml_type: int) -> str:
    """The ggml type's name (``Q4_K``), also for types kvik cannot decode."""
    if ggml_type in GGML_TYPE_SIZES:
        return GGML_TYPE_SIZES[ggml_type][0]
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def check_supported(ggml_type: int, tensor: str) -> None:
    """ValueError naming the type and the supported ones when ``ggml_type`` cannot be decoded."""
    if ggml_type not in GGML_TYPE_SIZES:
        raise ValueError(
            f"tensor {tensor!r} uses ggml type {type_name(ggml_type)}, which kvik-gguf cannot dequantize; "
            f"supported types: {', '.join(supported_type_names())}. Re-quantize the model to one of them "
            f"(e.g. llama-quantize ... Q4_K_M)."
        )


def row_bytes(ggml_type: int, cols: int) -> int:
    """Bytes of one row of ``cols`` values."""
    _, block, size = GGML_TYPE_SIZES[ggml_type]
    if cols % block:
        raise ValueError(f"a {type_name(ggml_type)} row needs a multiple of {block} values, got {cols}")
    return cols // block * size
