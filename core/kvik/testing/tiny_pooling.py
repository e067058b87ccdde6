"""Tiny random pooling checkpoints for tests: decoder embedders with sentence-transformers files,
and sequence classifiers (``*ForSequenceClassification``), written like real ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvik.testing.tiny_models import ARCHITECTURES, build_tokenizer, tiny_config

_ST_MODES = {"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def _save(path: Path, model: Any) -> None:
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(512).save_pretrained(path)


def make_tiny_embedder(
    path: str | Path,
    arch: str = "qwen3",
    pooling: str | None = "last",
    normalize: bool = True,
    max_seq_length: int = 256,
    **overrides: Any,
) -> Path:
    """A bare ``{Family}Model`` checkpoint (as ``AutoModel.save_pretrained`` writes it); with ``pooling``,
    the sentence-transformers ``modules.json`` / ``1_Pooling/config.json`` (and ``Normalize``) too;
    sentence-transformers truncates inputs to ``max_seq_length`` tokens."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    family = ARCHITECTURES[arch][1].removesuffix("ForCausalLM")
    config.architectures = [f"{family}Model"]
    _save(path, getattr(transformers, f"{family}Model")(config).eval())
    if pooling is None:
        return path
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {flag: mode == pooling for mode, flag in _ST_MODES.items()}
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": config.hidden_size, **flags})
    )
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    return path


def make_tiny_classifier(path: str | Path, arch: str = "qwen2", num_labels: int = 1, **overrides: Any) -> Path:
    """A ``{Family}ForSequenceClassification`` checkpoint (a cross-encoder reranker with one label)."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, num_labels=num_labels, **overrides)
    family = ARCHITECTURES[arch][1].removesuffix("ForCausalLM")
    config.architectures = [f"{family}ForSequenceClassification"]
    _save(path, getattr(transformers, f"{family}ForSequenceClassification")(config).eval())
    return path
