"""kvik_gguf.index: a GGUF's metadata and tensor table read once with gguf's reader, then from kvik's cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from kvik_gguf import format as gguf_format
from kvik_gguf.convert import write_gguf
from kvik_gguf.format import GGUFFormat
from kvik_gguf.index import MAX_INDEXED_ARRAY


def test_the_cached_index_reads_what_the_reader_reads(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf", "Q8_0")
    reader = gguf.GGUFReader(str(path))
    gguf_format._index.cache_clear()
    first = GGUFFormat(str(path))
    first_config = first.load_hf_config()
    assert len(list((tmp_path / "cache" / "gguf-index").glob("*.json"))) == 1

    # A new process: the reader must not be needed for the config, the scalars or the tensors.
    gguf_format._index.cache_clear()
    gguf_format._open_reader.cache_clear()
    opened: list[str] = []
    real_reader = gguf.GGUFReader

    def counting_reader(p: str, *args: object) -> object:
        opened.append(p)
        return real_reader(p, *args)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    again = GGUFFormat(str(path))
    assert again.load_hf_config().to_dict() == first_config.to_dict()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or len(field.data) > MAX_INDEXED_ARRAY:
            continue
        assert again.meta(name) == field.contents(), name
    assert again.meta("no.such.key") is None
    for t in reader.tensors:
        ours = again.tensors[t.name]
        assert (ours.name, ours.tensor_type, ours.n_bytes, ours.data_offset) == (
            t.name, int(t.tensor_type), t.n_bytes, t.data_offset
        )  # fmt: skip
        assert ours.shape.tolist() == t.shape.tolist()
        assert np.array_equal(np.asarray(ours.data), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert not opened, "the cached index still opened gguf's reader"

    # The vocabulary is not in the index: asking for it opens the reader, once.
    tokens = again.meta("tokenizer.ggml.tokens")
    assert tokens == reader.get_field("tokenizer.ggml.tokens").contents() and len(tokens) > MAX_INDEXED_ARRAY
    assert opened == [str(Path(path).resolve())]
