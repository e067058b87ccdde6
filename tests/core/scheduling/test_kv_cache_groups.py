"""plan_kv_cache_groups: layers grouped by window, groups of equal size sharing tensors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.scheduling.kv_cache_groups import KVCacheGroups, plan_kv_cache_groups


def test_one_window_for_every_layer_is_one_group() -> None:
    assert plan_kv_cache_groups([None] * 4) == KVCacheGroups((None,), (0,) * 4, (0, 1, 2, 3), 4)
    assert plan_kv_cache_groups([16] * 3).windows == (16,)


def test_gemma2_alternating_layers_make_two_groups_sharing_their_tensors() -> None:
    groups = plan_kv_cache_groups([8, None, 8, None, 8, None])
    assert groups.windows == (None, 8)
    assert groups.layer_group == (1, 0, 1, 0, 1, 0)
    assert groups.layer_tensor == (0, 0, 1, 1, 2, 2) and groups.num_tensors == 3


def test_gemma3_five_to_one_cuts_the_sliding_layers_into_groups_of_the_global_count() -> None:
    windows = [None if i % 6 == 5 else 512 for i in range(14)]  # global layers 5 and 11; 12 sliding
    groups = plan_kv_cache_groups(windows)
    assert groups.num_tensors == 2 and groups.windows == (None,) + (512,) * 6
    assert [groups.layer_group[i] for i in (5, 11)] == [0, 0]
    # Each tensor holds one layer of every group: no two layers of a group share one.
    for g in range(groups.num_groups):
        tensors = [t for t, gg in zip(groups.layer_tensor, groups.layer_group, strict=True) if gg == g]
        assert len(tensors) == len(set(tensors))


def test_a_shorter_last_group_leaves_pages_idle() -> None:
    groups = plan_kv_cache_groups([None, None, 4, 4, 4])  # sliding: groups of 2 and 1
    assert groups.windows == (None, 4, 4) and groups.num_tensors == 2
    assert groups.layer_group == (0, 0, 1, 1, 2) and groups.layer_tensor == (0, 1, 0, 1, 0)


def test_no_split_keeps_one_group_over_the_whole_context() -> None:
    assert plan_kv_cache_groups([8, None], split=False) == KVCacheGroups.single(2)


def test_the_split_is_kept_only_where_a_full_length_request_holds_fewer_pages() -> None:
    windows = [8, None, 8, None]
    # Requests of 64 tokens, steps of 64: a sliding group can never release (the window and a step cover all).
    assert plan_kv_cache_groups(windows, max_model_len=64, block_size=4, step_tokens=64).num_groups == 1
    # Steps of 16 tokens: a sliding group holds (8 + 16 - 3) // 4 + 3 = 8 blocks of its 16.
    assert plan_kv_cache_groups(windows, max_model_len=64, block_size=4, step_tokens=16).num_groups == 2


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one attention layer"):
        plan_kv_cache_groups([])
    with pytest.raises(ValueError, match="layer 1's sliding window must be >= 1"):
        plan_kv_cache_groups([None, 0])


@settings(max_examples=200, deadline=None)
@given(layer_windows=st.lists(st.sampled_from([None, 4, 8, 16]), min_size=1, max_size=40))
def test_any_plan_gives_each_layer_one_group_and_one_tensor_of_its_own_in_that_group(layer_windows) -> None:
    groups = plan_kv_cache_groups(layer_windows)
    n = len(layer_windows)
    assert len(groups.layer_group) == len(groups.layer_tensor) == n
    for g, window in enumerate(groups.windows):
        members = [i for i in range(n) if groups.layer_group[i] == g]
        assert members, f"group {g} is empty"
        assert all(layer_windows[i] == window for i in members)  # one window per group
        tensors = [groups.layer_tensor[i] for i in members]
        assert len(tensors) == len(set(tensors)) and max(tensors) < groups.num_tensors
    if len(set(layer_windows)) == 1:
        assert groups.num_groups == 1 and groups.num_tensors == n
    else:  # S tensors x G groups cover every layer (idle slots where the last group of a window is shorter)
        assert groups.num_tensors * groups.num_groups >= n
