"""Quantization formats: the interface and the unquantized default."""

from kvik.quantization.base import QuantizationMethod, RowQuantization
from kvik.quantization.unquantized import UnquantizedLinearMethod

__all__ = ["QuantizationMethod", "RowQuantization", "UnquantizedLinearMethod"]
