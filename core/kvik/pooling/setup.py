"""A checkpoint's pooling setup: the pooler type and normalisation, from sentence-transformers files.

sentence-transformers checkpoints list their modules in ``modules.json``; the
``Pooling`` module's folder holds ``config.json`` with ``pooling_mode_*`` flags
(``"pooling_mode": "mean"`` from sentence-transformers 6 on) and a ``Normalize``
module means unit-length embeddings. Without those files a
sequence classifier or decoder embedder pools its last token and a bidirectional
encoder its first (CLS) token; embeddings are then normalised (as vLLM does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvik.pooling.params import PoolingType

_MODES = {
    "pooling_mode_lasttoken": PoolingType.LAST,
    "pooling_mode_mean_tokens": PoolingType.MEAN,
    "pooling_mode_cls_token": PoolingType.CLS,
}

_NAMED_MODES = {"lasttoken": PoolingType.LAST, "mean": PoolingType.MEAN, "cls": PoolingType.CLS}


@dataclass(frozen=True, slots=True)
class PoolerSetup:
    pooling_type: PoolingType
    normalize: bool
    source: str  # where it came from, for the log


def read_pooler_setup(model_path: str | Path, default: PoolingType = PoolingType.LAST) -> PoolerSetup:
    """The pooler of the checkpoint at ``model_path``; ``default`` when it has no sentence-transformers files."""
    root = Path(model_path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return PoolerSetup(default, True, "default")
    modules = json.loads(modules_file.read_text())
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
    normalize = "Normalize" in kinds
    pooling_dir = kinds.get("Pooling")
    if pooling_dir is None:
        return PoolerSetup(default, normalize, str(modules_file))
    config_file = root / pooling_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    chosen = [kind for flag, kind in _MODES.items() if config.get(flag)]
    unsupported = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _MODES]
    named = config.get("pooling_mode")  # sentence-transformers >= 6 names the mode(s) instead of flags
    for mode in [named] if isinstance(named, str) else list(named or []):
        kind = _NAMED_MODES.get(str(mode))
        if kind is None:
            unsupported.append(f"pooling_mode={mode!r}")
        elif kind not in chosen:
            chosen.append(kind)
    if unsupported or len(chosen) > 1:
        raise ValueError(
            f"{config_file}: pooling modes {unsupported + [c.value for c in chosen]} are not supported; "
            "kvik pools one of: last token, mean, CLS"
        )
    return PoolerSetup(chosen[0] if chosen else default, normalize, str(config_file))


def model_pooler_setup(model_path: str | Path, architecture: str) -> PoolerSetup:
    """The pooler an architecture runs with: a classifier's head reads a fixed token (a decoder's last,
    an encoder's CLS); an embedder follows its sentence-transformers files, else that same token."""
    from kvik.pooling.architectures import is_classifier_architecture, is_encoder_architecture

    token = PoolingType.CLS if is_encoder_architecture(architecture) else PoolingType.LAST
    if is_classifier_architecture(architecture):
        config_file = Path(model_path) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if config.get("classifier_pooling") == "mean":  # ModernBERT's head may read the mean
            token = PoolingType.MEAN
        return PoolerSetup(token, False, f"{architecture}'s classification head")
    return read_pooler_setup(model_path, token)
