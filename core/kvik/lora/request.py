"""What a request names to run under an adapter (vLLM's ``LoRARequest``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter by name, positive integer id and PEFT checkpoint directory.

    ``lora_int_id`` identifies the adapter to the engine (slots, the prefix cache);
    one id always means one adapter: reusing it for another path is refused.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None  # accepted for vLLM compatibility; unused

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_path is empty; give the PEFT adapter's directory")

    @property
    def cache_key(self) -> tuple[object, ...]:
        """Mixed into every KV block hash of a request under this adapter: its blocks are its own."""
        return ("lora", self.lora_int_id, self.lora_path)
