"""``method: "draft_model"``: a second model drafts, the target verifies exactly.

A draft that is the target's own checkpoint proposes the target's tokens: nearly
every draft is accepted, greedily and (with its ``q``) when sampling. A different
random draft is almost never right, and greedy output must still be the target's.
The mix has prefix caching (shared prefixes), chunked prefill (a small step
budget), preemption (a tiny pool) and n > 1.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from kvik import LLM, SamplingParams
from kvik.sampling_params import SamplingParams as Params
from kvik.testing.reference import random_prompts

OPTIONS = dict(device="cpu", dtype="float32", block_size=16, max_model_len=96, max_num_seqs=8,
               max_num_batched_tokens=40)  # fmt: skip


def _prompts() -> list[dict]:
    rand = random_prompts(3, seed=5, low=8, high=50)
    return [{"prompt_token_ids": p} for p in [*rand, [*rand[0][:33], 9, 10]]]


def _params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=14, temperature=0, logprobs=1), SamplingParams(max_tokens=5, temperature=0),
            SamplingParams(max_tokens=12, temperature=0, n=2), SamplingParams(max_tokens=14, temperature=0)]  # fmt: skip


def _spec(draft, k: int = 3) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


def _tokens(outputs) -> list[tuple]:
    return [(c.token_ids, c.finish_reason) for o in outputs for c in o.outputs]


@pytest.fixture(scope="module")
def target(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def baseline(target) -> list:
    return LLM(target, num_kv_blocks=64, **OPTIONS).generate(_prompts(), _params(), use_tqdm=False)


def test_the_target_as_its_own_draft_is_accepted(target, baseline) -> None:
    llm = LLM(target, num_kv_blocks=64, speculative_config=_spec(target), **OPTIONS)
    got = llm.generate(_prompts(), _params(), use_tqdm=False)
    assert _tokens(got) == _tokens(baseline)
    drafted = sum(o.metrics.num_draft_tokens for o in got)
    accepted = sum(o.metrics.num_accepted_tokens for o in got)
    assert drafted > 20 and accepted / drafted > 0.95
    assert llm.llm_engine.get_stats().num_steps < 0.6 * sum(len(c.token_ids) for o in got for c in o.outputs)


@pytest.mark.parametrize("num_kv_blocks", [64, 9])  # 9 blocks of 16: preemption
def test_a_different_draft_keeps_greedy_output(tiny_model_dir, target, baseline, num_kv_blocks) -> None:
    draft = tiny_model_dir("llama", seed=1)
    want = baseline
    if num_kv_blocks != 64:
        want = LLM(target, num_kv_blocks=num_kv_blocks, **OPTIONS).generate(_prompts(), _params(), use_tqdm=False)
    llm = LLM(target, num_kv_blocks=num_kv_blocks, speculative_config=_spec(draft, 2), **OPTIONS)
    got = llm.generate(_prompts(), _params(), use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert sum(o.metrics.num_draft_tokens for o in got) > 0
    if num_kv_blocks != 64:
        assert llm.llm_engine.get_stats().num_preemptions > 0


def test_sampled_drafts_carry_their_distribution(target) -> None:
    """Sampling at temperature 1 with draft == target: p == q, so the min(1, p/q) rule accepts
    every draft. A verifier that treated the sampled drafts as one-hot would accept only ~p(d)."""
    llm = LLM(target, num_kv_blocks=64, speculative_config=_spec(target, 4), **OPTIONS)
    params = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    got = llm.generate(_prompts()[:3], params, use_tqdm=False)
    drafted = sum(o.metrics.num_draft_tokens for o in got)
    accepted = sum(o.metrics.num_accepted_tokens for o in got)
    assert drafted > 20 and accepted / drafted > 0.9
    # Sampled, not greedy: the outputs differ from the greedy continuation.
    greedy = llm.generate(_prompts()[:3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    assert _tokens(got) != _tokens(greedy)


def test_draft_tokens_follow_the_draft_distribution(target) -> None:
    """The drafter samples each unseeded non-greedy row from softmax(logits / T), the q it reports."""
    from kvik.spec_decode.draft_model import DraftModelDrafter
    from kvik.spec_decode.drafter import Drafter

    llm = LLM(target, num_kv_blocks=64, speculative_config=_spec(target), **OPTIONS)
    drafter = llm.llm_engine.runner.drafter
    assert isinstance(drafter, DraftModelDrafter) and isinstance(drafter, Drafter)
    logits = torch.zeros(4000, drafter.vocab_size)
    logits[:, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logits[:, 4:] = -30.0
    params = [Params(temperature=0.5)] * 4000
    tokens, q, sampled = drafter.pick(logits, params)
    assert all(sampled) and q is not None
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.5, 0)
    assert torch.allclose(q[0, :4], expected, atol=1e-5)
    freq = torch.bincount(tokens, minlength=4)[:4].double() / 4000
    assert torch.allclose(freq, expected.double(), atol=0.03)
    greedy, q, sampled = drafter.pick(
        logits[:3], [Params(temperature=0), Params(temperature=0.5, seed=1)] * 1 + [Params()]
    )
    assert greedy[:2].tolist() == [0, 0] and sampled == [False, False, True]


def test_a_draft_with_another_tokenizer_is_refused(tiny_model_dir, target) -> None:
    other = tiny_model_dir("llama", vocab_size=320)
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        LLM(target, num_kv_blocks=64, speculative_config=_spec(other), **OPTIONS)
    with pytest.raises(ValueError, match="needs 'model'"):
        LLM(target, speculative_config={"method": "draft_model", "num_speculative_tokens": 2}, **OPTIONS)


def test_a_draft_with_a_padded_vocabulary_drafts_in_the_targets(tmp_path, target, baseline) -> None:
    """Same tokenizer, embedding padded to 640 rows (as model families pad): drafts are cut to the target's ids."""
    from kvik.testing.tiny_models import make_tiny_model

    padded = make_tiny_model(tmp_path / "padded", seed=0, vocab_size=640)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the target's tokenizer, not one trained to 640
        shutil.copy(f"{target}/{name}", padded / name)
    llm = LLM(target, num_kv_blocks=64, speculative_config=_spec(padded, 2), **OPTIONS)
    assert llm.llm_engine.runner.drafter.draft.model_config.vocab_size == 640
    got = llm.generate(_prompts(), _params(), use_tqdm=False)
    assert _tokens(got) == _tokens(baseline)


def test_verify_rows_get_the_q_their_drafts_were_drawn_from() -> None:
    """draft_probs: sampled drafts' rows carry their q (a prefix when the engine cut the drafts),
    deterministic drafts' rows are one-hot, bonus rows zero; drafts that differ from the drawn ones
    are treated as deterministic."""
    from types import SimpleNamespace

    from kvik.scheduling.output import ScheduledRequest
    from kvik.spec_decode.config import SpeculativeConfig
    from kvik.spec_decode.drafter import Drafter

    class Fixed(Drafter):
        def load(self) -> None: ...

        def propose(self, layout, hidden, sampled):  # type: ignore[no-untyped-def]
            return {}

    runner = SimpleNamespace(model_config=SimpleNamespace(vocab_size=6), device=torch.device("cpu"),
                             config=SimpleNamespace(seed=0), block_size=16)  # fmt: skip
    drafter = Fixed(SpeculativeConfig("draft_model", 3, model="x"), runner)  # type: ignore[arg-type]
    q = torch.softmax(torch.randn(2, 3, 6), -1)  # two sampled requests, 3 drafts each
    per_position = [torch.cat([q[:, j], q[1:, j]]) for j in range(3)]  # [3 rows, 6]; "c" (greedy) has none
    drafter.remember(["a", "b", "c"], [[1, 2, 3], [4, 4, 4], [0, 1, 2]], per_position, [True, True, False])

    def req(rid: str, drafts: list[int]) -> ScheduledRequest:
        return ScheduledRequest(rid, [9, *drafts], 5, [], True, Params(), draft_token_ids=drafts)

    reqs = [req("a", [1, 2]), req("b", [4, 5, 4]), req("c", [0, 1, 2]), req("d", [])]
    counts = [3, 4, 4, 1]
    got = drafter.draft_probs(reqs, counts, torch.zeros(12, 6))
    assert got is not None
    assert torch.equal(got[0], q[0, 0]) and torch.equal(got[1], q[0, 1])  # "a": a prefix of its drafts
    assert not got[2].any()  # its bonus row
    onehot = torch.nn.functional.one_hot(torch.tensor([4, 5, 4, 0, 1, 2]), 6).float()
    assert torch.equal(got[3:6], onehot[:3])  # "b" was cut differently from what was drawn: deterministic
    assert torch.equal(got[7:10], onehot[3:])  # "c" drafted greedily
    assert not got[6].any() and not got[10].any() and not got[11].any()
    assert drafter.draft_probs(reqs, counts, torch.zeros(12, 6)) is None  # used once
