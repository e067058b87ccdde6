"""Prompt parsing (kvik.inputs): token-id lists are validated and copied, whatever their length."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvik.inputs import parse_prompt, token_id_list


@given(st.lists(st.integers(0, 2**31), max_size=300))
def test_a_token_list_comes_back_as_a_new_list_of_the_same_ints(ids: list[int]) -> None:
    got = parse_prompt(ids)
    assert got == ids and got is not ids and all(type(t) is int for t in got)
    assert parse_prompt(tuple(ids)) == ids


def test_int_subclasses_become_plain_ints() -> None:
    class Token(enum.IntEnum):
        BOS = 1

    got = parse_prompt([Token.BOS, 7])
    assert got == [1, 7] and all(type(t) is int for t in got)


@pytest.mark.parametrize("bad", [[True, 1], [1, 2.0], [1, "2"], [None], [[1]]])
def test_anything_but_ints_is_a_type_error(bad: list[object]) -> None:
    with pytest.raises(TypeError, match="a prompt must be"):
        parse_prompt(bad)


@given(st.lists(st.one_of(st.integers(-5, 2**40), st.booleans()), max_size=300))
def test_token_id_list_is_int_of_each_id(ids: list[int]) -> None:
    import numpy as np

    expected = [int(t) for t in ids]
    for given_ids in (ids, tuple(ids), np.array(expected, dtype=np.int64) if expected else []):
        got = token_id_list(given_ids)
        assert got == expected and got is not given_ids and all(type(t) is int for t in got)
