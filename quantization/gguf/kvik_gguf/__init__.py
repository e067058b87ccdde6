"""GGUF checkpoints for kvik.

``kvik_gguf.format.GGUFFormat`` reads llama.cpp's single-file checkpoints
(config, weights, tokenizer); ``kvik_gguf.method.GGUFLinearMethod`` keeps
their quantized blocks packed in memory and decodes them per matmul.
Both are registered through the ``kvik`` entry point ``gguf``.
"""

from __future__ import annotations

__version__ = "0.1.0"
