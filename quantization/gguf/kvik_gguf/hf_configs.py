"""A light Hugging Face config for Llama GGUF files.

transformers' ``LlamaConfig`` module imports its model-loading stack on first use
(``type_validators`` -> ``activations`` -> ... -> ``torch.distributed.tensor``): 1.4 s of a
``kvik generate`` cold start on the 2-core dev machine, for a config whose every field kvik
sets itself (kvik_gguf.config). This ``PretrainedConfig`` subclass holds the same values;
code that needs transformers' own class (the transformers fallback) converts it with
``AutoConfig.for_model(config.model_type, **config.to_dict())``. Module-level, so configs
pickle by reference into executor workers.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class GGUFLlamaConfig(PretrainedConfig):
    """Llama's fields as kvik_gguf.config sets them; ``hidden_act`` is Llama's SiLU."""

    model_type = "llama"

    def __init__(self, hidden_act: str = "silu", **kwargs: object) -> None:
        self.hidden_act = hidden_act
        super().__init__(**kwargs)
