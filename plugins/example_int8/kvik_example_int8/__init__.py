"""An example third-party kvik plugin: int8 weight-only linear layers.

See README.md next to this package for the walk-through.
"""

from __future__ import annotations

from kvik_example_int8.convert import quantize_checkpoint

__all__ = ["quantize_checkpoint"]
__version__ = "0.1.0"
