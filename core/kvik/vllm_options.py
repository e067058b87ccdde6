"""vLLM engine options kvik does not implement yet, and the value of each that means "off".

``LLM(tensor_parallel_size=1)`` is what vLLM code passes on one device: such a value is
accepted silently, so that code runs unchanged. Any other value is refused naming the
option ("not supported yet"), never "unknown option": the option is real, kvik lacks it.
"""

from __future__ import annotations

from typing import Any

ANY = object()  # a tuning knob that cannot change outputs: every value is accepted (and has no effect)

# option -> the values that ask for nothing kvik lacks (vLLM's defaults among them)
OFF_VALUES: dict[str, tuple[Any, ...] | object] = {
    "data_parallel_size": (1,),
    "enable_expert_parallel": (False,),
    "cpu_offload_gb": (0,),
    "swap_space": ANY,  # CPU swap for preempted sequences: kvik recomputes them instead
    "enable_prompt_adapter": (False,),
    "kv_transfer_config": (None,),
    "tokenizer_mode": ("auto",),
    "skip_tokenizer_init": (False,),
    "tokenizer_revision": (None, "main"),
    "code_revision": (None,),
    "hf_token": (None,),
    "hf_overrides": (None,),
    "task": ("auto", "generate"),
    "limit_mm_per_prompt": (None,),
    "mm_processor_kwargs": (None,),
    "allowed_local_media_path": ("",),
    "enable_sleep_mode": (False,),
    "disable_sliding_window": (False,),
    "disable_log_stats": ANY,
    "disable_async_output_proc": ANY,
    "max_seq_len_to_capture": ANY,
    "max_logprobs": (20,),  # kvik's fixed cap (kvik.sample.admission.MAX_LOGPROBS)
    "generation_config": ("auto",),
    "override_generation_config": (None,),
    "compilation_config": (None,),
    "served_model_name": (None,),
    "enable_prompt_embeds": (False,),
    "logits_processors": (None,),
}


def strip_off_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the vLLM options above; ValueError naming any set to something other than "off"."""
    refused = []
    for name in sorted(set(kwargs) & set(OFF_VALUES)):
        accepted = OFF_VALUES[name]
        value = kwargs[name]
        if accepted is ANY or (isinstance(accepted, tuple) and any(_same(value, a) for a in accepted)):
            continue
        shown = " or ".join(repr(a) for a in accepted) if isinstance(accepted, tuple) else "any value"
        refused.append(f"{name}={value!r} (only {shown} works today)")
    if refused:
        raise ValueError(
            f"vLLM engine option(s) not supported by kvik yet: {'; '.join(refused)}. "
            "Leave them at their default or drop them."
        )
    return {k: v for k, v in kwargs.items() if k not in OFF_VALUES}


def _same(value: Any, accepted: Any) -> bool:
    # True == 1 in Python: keep bools and numbers apart, so tensor_parallel_size=True is refused.
    if isinstance(value, bool) != isinstance(accepted, bool) or (value is None) != (accepted is None):
        return False
    return bool(value == accepted)
