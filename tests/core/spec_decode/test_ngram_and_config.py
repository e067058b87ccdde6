"""The n-gram proposer against a brute-force reference, and speculative_config's checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik.config import EngineConfig
from kvik.spec_decode.config import SpeculativeConfig
from kvik.spec_decode.ngram import ngram_lookup


def _reference(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=40),
    st.integers(1, 4),
    st.integers(0, 3),
    st.integers(0, 6),
)
def test_ngram_matches_brute_force(tokens, lo, extra, k) -> None:
    got = ngram_lookup(np.asarray(tokens, dtype=np.int64), lo, lo + extra, k).tolist()
    assert got == _reference(tokens, lo, lo + extra, k)


def test_ngram_prefers_the_longest_match() -> None:
    tokens = np.array([1, 2, 3, 9, 2, 3, 7, 8, 5, 1, 2, 3])
    assert ngram_lookup(tokens, 1, 3, 2).tolist() == [9, 2]  # "1 2 3" -> 9, not "2 3" -> 7 or "3" -> 9
    assert ngram_lookup(tokens, 4, 5, 2).tolist() == []


def test_config_parses_vllm_shapes() -> None:
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 3, 2, 4)
    assert SpeculativeConfig.parse({"method": "suffix", "num_speculative_tokens": 8}).method == "suffix"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "larger"),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unknown key"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a dict"),
    ],
)
def test_bad_configs_are_refused_clearly(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_unknown_method_is_refused_at_resolution(tiny_model_dir) -> None:
    from kvik import LLM

    with pytest.raises(ValueError, match=r"unknown method 'medusa'.*registered methods: .*ngram"):
        LLM(
            str(tiny_model_dir("llama")),
            device="cpu",
            speculative_config={"method": "medusa", "num_speculative_tokens": 2},
        )


def test_serve_flag_is_checked_before_loading() -> None:
    from kvik_server.cli import engine_kwargs, parse_serve_args

    args = parse_serve_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(SystemExit):
        parse_serve_args(["--speculative-config", '{"method": "ngram"}'])


def test_metrics_endpoint_families() -> None:
    """/metrics exports the engine's speculative counters (vLLM's spec_decode_* names)."""
    from kvik.engine.llm_engine import EngineStats
    from kvik_server.metrics import _EngineCollector

    class Engine:
        def get_stats(self) -> EngineStats:
            return EngineStats(1, 0, 0.1, 0, 0, 0, 10, 20, 5, 0.0, spec_draft_tokens=12, spec_accepted_tokens=7,
                               spec_accepted_per_position=(4, 2, 1), spec_drafted_per_position=(5, 4, 3),
                               spec_method="ngram", spec_disabled_steps=2)  # fmt: skip

    families = list(_EngineCollector(Engine(), "m", None).collect())
    samples = {(s.name, s.labels.get("position")): s.value for family in families for s in family.samples}
    assert all(s.labels["method"] == "ngram" for f in families if "spec_decode" in f.name for s in f.samples)
    assert samples[("kvik:spec_decode_acceptance_rate", None)] == pytest.approx(7 / 12)
    assert samples[("kvik:spec_decode_disabled_steps_total", None)] == 2
    rates = [samples[("kvik:spec_decode_acceptance_rate_per_pos", str(i))] for i in range(3)]
    assert rates == pytest.approx([4 / 5, 2 / 4, 1 / 3])
    assert samples[("kvik:spec_decode_num_draft_tokens_total", None)] == 12
    assert samples[("kvik:spec_decode_num_accepted_tokens_total", None)] == 7
    assert [samples[("kvik:spec_decode_num_accepted_tokens_per_pos_total", str(i))] for i in range(3)] == [4, 2, 1]
