"""kvik's greedy tokens under each adapter equal transformers + PEFT's merged model, in mixed batches."""

from __future__ import annotations

import pytest
from kvik import LLM, LoRARequest, SamplingParams
from lora_world import MAX_NEW, LoRAWorld

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _mixed(world: LoRAWorld) -> tuple[list[list[int]], list[LoRARequest | None], list[list[int]]]:
    """Every prompt under the base model and each adapter, interleaved, with the expected tokens."""
    prompts, loras, expected = [], [], []
    for j, prompt in enumerate(world.prompts):
        for k, lora in enumerate([None, *world.loras]):
            prompts.append(prompt)
            loras.append(lora)
            expected.append(world.base_tokens[j] if lora is None else world.lora_tokens[k - 1][j])
    return prompts, loras, expected


def test_adapters_change_the_output(lora_world: LoRAWorld) -> None:
    # Non-zero B weights: every adapter moves greedy decoding somewhere for some prompt.
    for tokens in lora_world.lora_tokens:
        assert tokens != lora_world.base_tokens


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_one_mixed_batch_matches_peft_merged(lora_world: LoRAWorld, prefix_caching: bool) -> None:
    llm = LLM(str(lora_world.base), enable_lora=True, max_loras=3, max_lora_rank=8,
              enable_prefix_caching=prefix_caching, num_kv_blocks=128)  # fmt: skip
    prompts, loras, expected = _mixed(lora_world)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    slots = llm.llm_engine.runner.lora  # type: ignore[attr-defined]
    assert slots.num_loads == 3  # three slots, three adapters: each loaded once
    # Admission started each adapter's read on a background thread; the first step took the result.
    assert slots.num_prefetched == slots.num_disk_reads == 3


def test_one_slot_cycling_three_adapters_gives_the_same_tokens(lora_world: LoRAWorld) -> None:
    # max_loras=1 and a host cache of 1: every switch swaps the slot and rereads the adapter from disk.
    llm = LLM(str(lora_world.base), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8,
              max_num_seqs=4, num_kv_blocks=128)  # fmt: skip
    prompts, loras, expected = _mixed(lora_world)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    slots = llm.llm_engine.runner.lora  # type: ignore[attr-defined]
    assert slots.num_loads >= 3 and slots.num_disk_reads >= 3
    # Again, one adapter per call in a cycle: the slot is refilled at each switch, and only then.
    for k in (0, 1, 2, 0, 0):
        lora = lora_world.loras[k]
        before, switch = slots.num_loads, lora.lora_int_id not in slots.slot_of
        out = llm.generate(lora_world.prompts, GREEDY, use_tqdm=False, lora_request=lora)
        assert [list(o.outputs[0].token_ids) for o in out] == lora_world.lora_tokens[k]
        assert slots.num_loads == before + switch and list(slots.slot_of) == [lora.lora_int_id]


def test_prefix_cache_is_never_shared_across_adapters(lora_world: LoRAWorld) -> None:
    llm = LLM(str(lora_world.base), enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4, num_kv_blocks=128,
              max_model_len=256)  # fmt: skip
    engine = llm.llm_engine
    prompt = lora_world.prompts[0] * 3  # several full blocks
    one = SamplingParams(temperature=0.0, max_tokens=1)
    a, b = lora_world.loras[0], lora_world.loras[1]
    for lora in (None, a, b):
        llm.generate([prompt], one, use_tqdm=False, lora_request=lora)
    assert engine.get_stats().prefix_cache_hits == 0  # the same prompt under three "models": no hit
    llm.generate([prompt], one, use_tqdm=False, lora_request=b)
    hits = engine.get_stats().prefix_cache_hits
    assert hits >= 4 * ((len(prompt) - 1) // 4)  # the same adapter again: its own blocks are reused
