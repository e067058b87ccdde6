"""The tokenizer a GGUF describes, built by transformers and checked against the metadata.

With torch installed, transformers builds it (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``). transformers' GGUF reader imports torch, so without torch
(the MLX platform) :func:`build_without_torch` feeds the same metadata, read
with the ``gguf`` package, to transformers' torch-free tokenizer converter;
tests check both give the same tokenizer.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvik.models.disk_cache import cache_entry, write_folder_atomically

# llama.cpp pre-tokenizer names whose original Hugging Face tokenizer isolates every
# digit before the byte-level split (tokenizer.json: Sequence[Digits(individual_digits),
# ByteLevel]). transformers' GGUF tokenizer builder does not know them and applies a
# plain ByteLevel split, which lets " 12" become one pre-token.
DIGIT_SPLITTING_PRE_TOKENIZERS = frozenset({"smollm"})


logger = logging.getLogger(__name__)

# (realpath, size, mtime_ns) -> the tokenizer built for that file version, kept only where kvik's
# cache folder cannot hold it (see load_gguf_tokenizer)
_BUILT: dict[tuple[str, int, int], Any] = {}
# Part of the disk cache's key: bump when _build changes what it makes.
_BUILD_VERSION = 1


def load_gguf_tokenizer(path: str, meta: Callable[[str], Any]) -> Any:
    """``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` plus the fixes the file calls for.

    Building it re-reads the vocabulary: 7.4 s of the bundled SmolLM2's 9.3 s start-up on a
    2-core machine. So the result is kept per file version on disk (:mod:`kvik.models.disk_cache`,
    a ``tokenizer.json`` folder that loads in ~0.1 s), and each caller loads its own tokenizer
    from there. Only where that folder cannot be written is the built tokenizer kept in the
    process, each caller getting a deep copy: keeping it there always meant two tokenizers in
    every engine's process (~10 MB of a one-chat ``kvik generate``'s peak memory).
    """
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _BUILT:
        return copy.deepcopy(_BUILT[key])
    import transformers

    saved = cache_entry("gguf-tokenizers", (*key, transformers.__version__, _BUILD_VERSION))
    if (saved / "tokenizer.json").is_file():
        try:
            return _load_saved(saved)
        except (OSError, ValueError) as exc:  # a damaged entry: build again and replace it
            logger.info("rebuilding the cached tokenizer of %s (%s)", path, exc)
    tokenizer = _build(path, meta)
    write_folder_atomically(saved, lambda folder: tokenizer.save_pretrained(str(folder)))
    if not (saved / "tokenizer.json").is_file():  # a read-only cache folder: keep it in the process
        if len(_BUILT) >= 4:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = tokenizer
        return copy.deepcopy(tokenizer)
    return tokenizer


def _load_saved(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, through the class its ``tokenizer_config.json`` names.

    ``AutoTokenizer`` would resolve the same class, but its first call imports transformers' model
    mappings: ~0.4 s of a 2-core machine's ~4 s cold start, for a name this folder already holds.
    """
    import json

    import transformers

    name = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(folder))


def _torch_importable() -> bool:
    if "torch" in sys.modules:
        return sys.modules["torch"] is not None
    return importlib.util.find_spec("torch") is not None


def _build(path: str, meta: Callable[[str], Any]) -> Any:
    if _torch_importable():
        from transformers import AutoTokenizer

        p = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    else:
        tokenizer = build_without_torch(path, meta)
    _check_special_tokens(tokenizer, meta, path)
    template = meta("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    if meta("tokenizer.ggml.pre") in DIGIT_SPLITTING_PRE_TOKENIZERS:
        split_digits(tokenizer)
    return tokenizer


# transformers' names for the special tokens, and the GGUF keys holding their ids.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def build_without_torch(path: str, meta: Callable[[str], Any]) -> Any:
    """The tokenizer transformers builds for the GGUF at ``path``, from ``meta`` (a metadata
    reader) and transformers' tokenizer converter: what ``from_pretrained(gguf_file=...)``
    does, minus its torch-importing file reader."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    grouped = {
        group: {name: value for key, name in renames.items() if (value := meta(f"tokenizer.{key}")) is not None}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, config = grouped["tokenizer"], grouped["tokenizer_config"]
    kind = vocab.get("tokenizer_type")
    if kind == "llama":  # older sentencepiece files carry no flag; llama.cpp adds BOS there
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":  # its chat template writes <bos> itself
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = meta(f"tokenizer.ggml.{key}")
        config[name] = vocab["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta("general.architecture"), vocab)
    return TokenizersBackend(tokenizer_object=backend, name_or_path=path, **config, **extra)


def split_digits(tokenizer: Any) -> None:
    """Put a ``Digits(individual_digits=True)`` step before the tokenizer's byte-level pre-tokenizer."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    current = backend.pre_tokenizer
    steps = [pre_tokenizers.Digits(individual_digits=True)]
    if current is not None:
        steps.append(current)
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)


def _check_special_tokens(tokenizer: Any, meta: Callable[[str], Any], path: str) -> None:
    """The ids transformers resolved for BOS/EOS/PAD must be the ones the file names."""
    for attr, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ):
        expected = meta(key)
        actual = getattr(tokenizer, attr, None)
        if expected is not None and actual != expected:
            raise ValueError(
                f"tokenizer built from {path} has {attr}={actual}, but the file's {key} is {expected}; "
                "the GGUF's vocabulary and special-token metadata disagree"
            )
