"""kvik_gguf.index: a GGUF's metadata and tensor table read once with gguf's reader, then from kvik's cache."""

from __future__ import annotations

import gc
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


def _maps_of(path: Path) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if line.rstrip().endswith(str(path.resolve()))]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps the Linux way")
def test_tensors_are_read_not_mapped(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map of the file kept every page loading touched in the process's resident memory for its whole life
    (the cached index held it): the bundled SmolLM2's 117 MB of weights were counted twice."""
    monkeypatch.setenv("KVIK_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf", "Q8_0")
    gguf_format._index.cache_clear()
    GGUFFormat(str(path)).load_hf_config()  # parses with gguf's reader (which maps the file) and caches the index
    gguf_format._index.cache_clear()
    gguf_format._open_reader.cache_clear()
    gc.collect()
    fmt = GGUFFormat(str(path))
    weights = dict(fmt.iter_weights(quantized=True))
    assert weights and not _maps_of(path)
    entry = fmt.tensors["token_embd.weight"]
    data = entry.data
    assert data.flags.writeable and data.flags.owndata and data.nbytes == entry.n_bytes
    assert bytes(data[:64]) == path.read_bytes()[entry.data_offset : entry.data_offset + 64]

    # A file cut short after its index was cached: reading a tensor past the end is a clear error.
    path.write_bytes(path.read_bytes()[: entry.data_offset + entry.n_bytes // 2])
    with pytest.raises(ValueError, match=r"ends inside tensor 'token_embd.weight'.*truncated"):
        entry.data  # noqa: B018
