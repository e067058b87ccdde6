"""BERT-family and ModernBERT encoders (kvik.models.bert, kvik.models.modernbert): embeddings against sentence-transformers and cross-encoder
scores against its CrossEncoder, in float32, one batch of varied lengths; positions and token types as
transformers computes them; whole prompts per step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvik import LLM
from kvik.pooling import PoolingParams
from kvik.testing.tiny_encoders import make_tiny_cross_encoder, make_tiny_encoder

TEXTS = [
    "hello world",
    "tell me a story about a cat and a dog, and then tell me another one about a fish",
    "a",
    "def main(): print('hello')",
    "the quick brown fox jumps over the lazy dog",
]
ENGINE = dict(dtype="float32", device="cpu", num_threads=1)
EMBEDDERS = {
    "bert-mean": ("bert", "mean", True),
    "xlmr-cls": ("xlm-roberta", "cls", False),
    "bert-last": ("bert", "last", True),
    "modernbert-mean": ("modernbert", "mean", True),  # rotary; local layers see 4 tokens either side
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    paths = {name: make_tiny_encoder(root / name, fam, pool, norm) for name, (fam, pool, norm) in EMBEDDERS.items()}
    paths["bert-ce"] = make_tiny_cross_encoder(root / "bert-ce", "bert", num_labels=1)
    paths["xlmr-ce"] = make_tiny_cross_encoder(root / "xlmr-ce", "xlm-roberta", num_labels=1)
    paths["modernbert-ce"] = make_tiny_cross_encoder(root / "modernbert-ce", "modernbert", classifier_pooling="mean")
    return paths


@pytest.fixture(scope="module")
def engines(checkpoints: dict[str, Path]) -> Iterator[dict[str, LLM]]:
    yield {name: LLM(str(path), **ENGINE) for name, path in checkpoints.items()}


@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_embeddings_equal_sentence_transformers(checkpoints: dict[str, Path], engines: dict[str, LLM], name: str) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(checkpoints[name]), device="cpu").encode(TEXTS, batch_size=len(TEXTS))
    llm = engines[name]
    outputs = llm.embed(TEXTS)  # one step: five requests of different lengths, padded and masked
    got = np.array([o.outputs.embedding for o in outputs])
    assert got.shape == reference.shape
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    assert len({len(o.prompt_token_ids) for o in outputs}) > 2
    single = np.array([llm.embed(t)[0].outputs.embedding for t in TEXTS])
    np.testing.assert_allclose(single, got, atol=1e-5)
    if EMBEDDERS[name][2]:
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["bert-ce", "xlmr-ce", "modernbert-ce"])
def test_cross_encoder_scores_equal_sentence_transformers(
    checkpoints: dict[str, Path], engines: dict[str, LLM], name: str
) -> None:
    from sentence_transformers import CrossEncoder

    query = "tell me a story"
    docs = ["a story about a cat", "def main(): pass", "hello", "the lazy dog sleeps all day long"]
    reference = CrossEncoder(str(checkpoints[name]), device="cpu").predict([(query, d) for d in docs])
    got = [o.outputs.score for o in engines[name].score(query, docs)]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-6)
    assert np.ptp(got) > 1e-3  # the documents are told apart


def test_bert_pairs_use_token_types(checkpoints: dict[str, Path], engines: dict[str, LLM]) -> None:
    """The second segment of a pair is token type 1 (transformers' text-pair encoding), not 0."""
    import transformers

    llm = engines["bert-ce"]
    tok = llm.get_tokenizer()
    pair = tok(text="tell me a story", text_pair="a story about a cat")
    assert 1 in pair["token_type_ids"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoints["bert-ce"]).eval()
    ids = torch.tensor([pair["input_ids"]])
    with torch.no_grad():
        typed = float(hf(ids, token_type_ids=torch.tensor([pair["token_type_ids"]])).logits[0, 0])
        untyped = float(hf(ids).logits[0, 0])
    raw = llm.encode([pair["input_ids"]], PoolingParams(task="classify", activation=False))[0].outputs.data
    assert raw[0] == pytest.approx(typed, abs=1e-5)
    assert abs(typed - untyped) > 1e-4


def test_roberta_positions_skip_padding_tokens(checkpoints: dict[str, Path], engines: dict[str, LLM]) -> None:
    """A padding id inside a prompt takes position pad_token_id and the rest count on (as transformers does)."""
    import transformers

    hf = transformers.AutoModel.from_pretrained(checkpoints["xlmr-cls"]).eval()
    ids = [0, 17, 1, 23, 1, 9, 2]  # 1 is <pad>
    with torch.no_grad():
        cls = hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state[0, 0]
    got = engines["xlmr-cls"].encode([ids, [0, 5, 2]], PoolingParams())[0].outputs.data
    np.testing.assert_allclose(got, cls.numpy(), rtol=1e-4, atol=1e-5)


def test_encoders_run_whole_prompts_and_refuse_what_cannot_fit(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["xlmr-ce"]), **ENGINE, enable_chunked_prefill=True, max_num_batched_tokens=16)
    config = llm.llm_engine.config
    assert not config.enable_chunked_prefill and not config.enable_prefix_caching
    assert config.max_num_batched_tokens >= 128  # XLM-R: 130 position embeddings, 2 before the first token
    assert llm.llm_engine.model_config.max_model_len == 128
    assert config.block_size == 128  # no KV cache: one bookkeeping block per request
    long = llm.classify(["word " * 20])[0]  # longer than a step of 16 tokens: still one step
    assert len(long.prompt_token_ids) > 16 and len(long.outputs.probs) == 1
    assert len(llm.classify([[5] * 128])[0].prompt_token_ids) == 128  # a full-length input (nothing is generated)
    with pytest.raises(ValueError, match="max_model_len is 128"):
        llm.classify([[5] * 129])
    with pytest.raises(ValueError, match="longer than the model supports"):
        LLM(str(checkpoints["bert-mean"]), **ENGINE, max_model_len=256)


def test_a_user_block_size_is_kept_and_gives_the_same_vectors(checkpoints: dict[str, Path], engines: dict[str, LLM]) -> None:
    llm = LLM(str(checkpoints["bert-mean"]), **ENGINE, block_size=16)
    assert llm.llm_engine.config.block_size == 16 and engines["bert-mean"].llm_engine.config.block_size > 16
    got = [o.outputs.embedding for o in llm.embed(TEXTS)]
    want = [o.outputs.embedding for o in engines["bert-mean"].embed(TEXTS)]
    np.testing.assert_array_equal(np.array(got), np.array(want))


@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=9), min_size=1, max_size=4),
    padding_rows=st.integers(0, 2),
)
def test_positions_and_token_types_follow_transformers_rules(prompts: list[list[int]], padding_rows: int) -> None:
    """Over a flattened step: RoBERTa positions (non-pad tokens count from pad+1, pads sit at pad) and BERT token
    types (1 after a request's first [SEP]), each request counted on its own, for any ids (1 = pad, 3 = sep)."""
    from kvik.models.bert import BertModel

    model = BertModel.__new__(BertModel)  # only the index arithmetic: no weights needed
    model.pad_token_id, model.sep_token_id = 1, 3
    real = sum(len(p) for p in prompts)
    flat = torch.tensor([t for p in prompts for t in p] + [0] * padding_rows)
    positions = torch.cat([torch.arange(len(p)) for p in prompts] + [torch.zeros(padding_rows, dtype=torch.int64)])
    model.position_offset = 2
    got_positions = model._positions(flat, positions)[:real].tolist()
    got_types = model._token_types(flat, positions)[:real].tolist()
    want_positions, want_types = [], []
    for p in prompts:
        seen = 0
        for i, t in enumerate(p):
            seen += t != 1
            want_positions.append(seen + 1 if t != 1 else 1)
            want_types.append(int(3 in p[:i]))
    assert got_positions == want_positions
    assert got_types == want_types
