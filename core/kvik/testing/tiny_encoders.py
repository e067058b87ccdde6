"""Tiny random BERT-family checkpoints for tests: sentence-transformers embedders written by
sentence-transformers' own classes, and cross-encoders (``*ForSequenceClassification``)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

from kvik.testing.tiny_models import _CORPUS

# family -> (transformers config class, body class, classifier class)
ENCODERS = {
    "bert": ("BertConfig", "BertModel", "BertForSequenceClassification"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "XLMRobertaForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaModel", "RobertaForSequenceClassification"),
    "modernbert": ("ModernBertConfig", "ModernBertModel", "ModernBertForSequenceClassification"),
}


@functools.cache  # training takes a moment; a tokenizer is only saved, never changed
def build_encoder_tokenizer(family: str) -> Any:
    """A WordPiece ``BertTokenizer`` (bert) or a Unigram ``XLMRobertaTokenizer`` (the RoBERTas), trained on
    a small corpus: real special tokens and pair encodings (``[CLS] a [SEP] b [SEP]``, ``<s> a </s></s> b </s>``)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if family in ("bert", "modernbert"):  # ModernBERT's own is BPE with the same [CLS] a [SEP] layout
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator([_CORPUS] * 4, trainer=trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=specials, show_progress=False))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            (vocab_file,) = tok.model.save(tmp)
            return transformers.BertTokenizer(vocab_file)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainers.UnigramTrainer(
        vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False))  # fmt: skip
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    return transformers.XLMRobertaTokenizer(vocab=[*pieces, ("<mask>", 0.0)])


def tiny_encoder_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    import transformers

    values: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        type_vocab_size=2,
    )
    if family == "modernbert":  # rotary, no token types; 4 layers alternating global / local (window 4 each side)
        values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=128, global_attn_every_n_layers=2,
                      local_attention=8, global_rope_theta=1000.0, local_rope_theta=100.0, pad_token_id=0,
                      cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)  # fmt: skip
    elif family != "bert":  # positions start after pad_token_id = 1; one token type
        values.update(max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    values.update(overrides)
    return getattr(transformers, ENCODERS[family][0])(**values)


def _randomize(model: Any) -> Any:
    """Weights far from the init (biases and LayerNorm scales too), so every tensor's loading shows."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
            elif "LayerNorm.weight" in name or "norm.weight" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def make_tiny_encoder(
    path: str | Path, family: str = "bert", pooling: str = "mean", normalize: bool = True, **overrides: Any
) -> Path:
    """A sentence-transformers model directory (Transformer -> Pooling [-> Normalize]) saved by
    ``SentenceTransformer.save`` around a tiny random ``BertModel`` / ``XLMRobertaModel``."""
    import transformers
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models  # type: ignore[attr-defined,no-redef]

    path = Path(path)
    tokenizer = build_encoder_tokenizer(family)
    config = tiny_encoder_config(family, len(tokenizer), **overrides)
    body = _randomize(getattr(transformers, ENCODERS[family][1])(config))
    with tempfile.TemporaryDirectory() as tmp:
        body.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        modules: list[Any] = [models.Transformer(tmp)]
        modes = {"mean": "mean", "cls": "cls", "last": "lasttoken"}
        modules.append(models.Pooling(config.hidden_size, pooling_mode=modes[pooling]))
        if normalize:
            modules.append(models.Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def make_tiny_cross_encoder(path: str | Path, family: str = "bert", num_labels: int = 1, **overrides: Any) -> Path:
    """A cross-encoder checkpoint: a tiny random ``*ForSequenceClassification`` and its tokenizer."""
    import transformers

    path = Path(path)
    tokenizer = build_encoder_tokenizer(family)
    config = tiny_encoder_config(family, len(tokenizer), num_labels=num_labels, **overrides)
    model = _randomize(getattr(transformers, ENCODERS[family][2])(config))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
