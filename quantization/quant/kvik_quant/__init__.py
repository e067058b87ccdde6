"""kvik-quant: FP8 W8A8, INT4 weight-only (GPTQ, AWQ) and compressed-tensors checkpoints for kvik."""

__version__ = "0.1.0"
