"""A GGUF file's metadata and tensor table, parsed once and kept on disk.

``gguf.GGUFReader`` parses every metadata field, the 49k-token vocabulary and its merges
included, into numpy views: 2.3 s for the bundled SmolLM2 on a 2-core machine, on every
start. What a start needs afterwards is small: the scalar fields (config, special token ids,
chat template) and each tensor's name, type, shape and byte range. :func:`open_index`
parses with the reader the first time, keeps that as JSON in kvik's cache folder
(:func:`kvik.models.disk_cache.cache_dir`), and later starts read the JSON; each tensor's bytes
are read from the file when asked for (:attr:`TensorEntry.data`). Large array fields (the
vocabulary) are left out of the index; asking for one opens the full reader, as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from kvik.models.disk_cache import cache_entry, write_atomically

logger = logging.getLogger(__name__)

# Array fields up to this length are kept in the index (rope dimension sections and the like);
# longer ones (tokens, merges, scores) are read from the file on demand.
MAX_INDEXED_ARRAY = 256
# Part of the cache key: bump when the index's content or layout changes.
_INDEX_VERSION = 1


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """What kvik reads of one tensor: the reader's field names; :attr:`data` reads its bytes from the file."""

    name: str
    tensor_type: int
    shape: np.ndarray  # GGUF order: innermost dimension first
    n_bytes: int
    data_offset: int  # absolute, in the file
    path: str

    @property
    def data(self) -> np.ndarray:
        """The tensor's ``n_bytes`` as a fresh uint8 array, read from the file.

        Read, not memory-mapped: every page of a map that loading touches stays in the process's
        resident set for as long as the map lives (the index is cached per file, so for the whole
        process), which for the bundled SmolLM2 was its 117 MB of weights counted a second time next
        to the loaded copy. Read pages sit in the OS page cache, shared and not counted.
        """
        out = np.empty(self.n_bytes, dtype=np.uint8)
        view = memoryview(out)
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_offset)
            while done < self.n_bytes:
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(
                        f"GGUF file {self.path} ends inside tensor {self.name!r} (bytes {self.data_offset} to "
                        f"{self.data_offset + self.n_bytes}): the file is truncated; fetch it again"
                    )
                done += got
        return out


@dataclass(slots=True)
class GGUFIndex:
    fields: dict[str, Any]  # scalar and short array fields
    large: frozenset[str]  # array fields left in the file
    tensors: list[TensorEntry]
    open_reader: Callable[[], Any]  # the full reader, for a large field

    def meta(self, key: str) -> Any:
        if key in self.fields:
            return self.fields[key]
        if key in self.large:
            field = self.open_reader().get_field(key)
            return None if field is None else field.contents()
        return None


def open_index(path: str, size: int, mtime_ns: int, open_reader: Callable[[], Any]) -> GGUFIndex:
    """The index of the GGUF at ``path`` (real path; size and mtime identify its version)."""
    entry = cache_entry("gguf-index", (path, size, mtime_ns, _INDEX_VERSION), ".json")
    raw: dict[str, Any] | None = None
    if entry.is_file():
        try:
            raw = json.loads(entry.read_text())
        except (OSError, ValueError) as exc:
            logger.info("re-reading %s: its cached index is unreadable (%s)", path, exc)
    if raw is None:
        raw = _from_reader(open_reader())
        write_atomically(entry, json.dumps(raw, default=_plain).encode())
    return _build(path, raw, open_reader)


def _from_reader(reader: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    large: list[str] = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the header's own (version, counts): not metadata
            continue
        if len(field.data) > MAX_INDEXED_ARRAY:
            large.append(name)
            continue
        value = field.contents()
        fields[name] = value
    tensors = [
        [t.name, int(t.tensor_type), [int(d) for d in t.shape.tolist()], int(t.n_bytes), int(t.data_offset)]
        for t in reader.tensors
    ]
    return {"fields": fields, "large": large, "tensors": tensors}


def _plain(value: Any) -> Any:
    """numpy scalars and arrays inside field values, as JSON takes them."""
    return value.item() if isinstance(value, np.generic) else np.asarray(value).tolist()


def _build(path: str, raw: dict[str, Any], open_reader: Callable[[], Any]) -> GGUFIndex:
    tensors = [
        TensorEntry(name, kind, np.array(shape, dtype=np.uint64), n_bytes, offset, path)
        for name, kind, shape, n_bytes, offset in raw["tensors"]
    ]
    return GGUFIndex(dict(raw["fields"]), frozenset(raw["large"]), tensors, open_reader)
