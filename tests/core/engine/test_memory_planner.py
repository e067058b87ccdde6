"""KV pool sizing and max_model_len checks."""

from __future__ import annotations

import pytest
from kvik.engine.memory_planner import plan_memory

MiB = 1 << 20


def _plan(**overrides):
    args = dict(
        total_bytes=1000 * MiB,
        free_bytes=1000 * MiB,
        utilization=0.5,
        weight_bytes=100 * MiB,
        activation_bytes=50 * MiB,
        block_bytes=1 * MiB,
        block_size=16,
        max_model_len=1024,
        max_num_seqs=1000,
        auto_max_model_len=False,
    )
    args.update(overrides)
    return plan_memory(**args)


def test_utilization_budget_minus_weights_and_activations():
    plan = _plan()
    assert plan.num_blocks == 500 - 100 - 50
    assert plan.kv_bytes == plan.num_blocks * MiB


def test_free_memory_caps_the_budget():
    assert _plan(free_bytes=200 * MiB).num_blocks == 150


def test_explicit_kv_cache_memory_and_num_blocks():
    assert _plan(kv_cache_memory=64 * MiB, max_model_len=256).num_blocks == 64
    assert _plan(num_blocks=7, max_model_len=64).num_blocks == 7


def test_pool_capped_by_what_max_num_seqs_can_use():
    plan = _plan(max_num_seqs=2, max_model_len=160)  # 10 blocks per sequence
    assert plan.num_blocks == 2 * 10 + 1


def test_too_long_max_model_len_says_what_fits():
    with pytest.raises(ValueError) as info:
        _plan(kv_cache_memory=10 * MiB, max_model_len=1024)
    message = str(info.value)
    assert "max_model_len 1024" in message and "largest max_model_len that fits is 144" in message


def test_auto_lowers_max_model_len():
    plan = _plan(kv_cache_memory=10 * MiB, max_model_len=1024, auto_max_model_len=True)
    assert plan.max_model_len == 144
    assert plan.max_concurrent_full_length == 1


def test_nothing_left_is_a_clear_error():
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        _plan(weight_bytes=600 * MiB)


def test_a_shared_sliding_window_lets_max_model_len_exceed_the_pool():
    """Every layer slides with a 256-token window and steps take 128 tokens (blocks of 16): a request holds at
    most (256 + 128 - 3) // 16 + 3 = 26 blocks, whatever its length."""
    window = dict(group_windows=(256,), step_tokens=128)
    plan = _plan(kv_cache_memory=40 * MiB, max_model_len=4096, **window)
    assert (plan.num_blocks, plan.max_model_len, plan.blocks_per_request) == (40, 4096, 26)
    assert plan.max_concurrent_full_length == 1
    assert _plan(max_num_seqs=2, max_model_len=4096, **window).num_blocks == 2 * 26 + 1  # what 2 requests can hold
    with pytest.raises(ValueError, match=r"26 KV blocks per request \(its 256-token sliding window"):
        _plan(kv_cache_memory=20 * MiB, max_model_len=4096, **window)
    assert _plan(kv_cache_memory=20 * MiB, max_model_len=4096, auto_max_model_len=True, **window).max_model_len == 304


def test_kv_cache_groups_count_a_block_per_group_per_position():
    """A global group and two sliding groups (window 256, steps of 128, blocks of 16): a 4,096-token request
    holds 256 global blocks and at most 26 in each sliding group; the pool's token count is the global group's."""
    groups = dict(group_windows=(None, 256, 256), step_tokens=128)
    plan = _plan(kv_cache_memory=400 * MiB, max_model_len=4096, **groups)
    assert plan.blocks_per_request == 256 + 2 * 26
    assert plan.kv_tokens == 400 * 16
    with pytest.raises(ValueError, match=r"308 KV blocks per request \(its 256-token sliding window .* 3 KV-cache"):
        _plan(kv_cache_memory=300 * MiB, max_model_len=4096, **groups)
    # 'auto': the longest request whose blocks fit in 299 (the null block aside): 247 global blocks + 52.
    auto = _plan(kv_cache_memory=300 * MiB, max_model_len=4096, auto_max_model_len=True, **groups)
    assert auto.max_model_len == 247 * 16 and auto.blocks_per_request == 299
