"""Hugging Face checkpoint directories: config.json + *.safetensors (+ tokenizer files)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvik.models.formats import ModelFormat

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFormat(ModelFormat):
    """A directory with ``config.json`` and one or more ``.safetensors`` files.

    Weights are read lazily, one tensor at a time, so peak host memory stays
    near one tensor however large the checkpoint is.
    """

    name = "safetensors"

    @classmethod
    def matches(cls, path: str) -> bool:
        p = Path(path)
        return p.is_dir() and (p / "config.json").is_file()

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._dir = Path(path)
        self._raw_config: dict[str, Any] | None = None

    # -- config -------------------------------------------------------------
    def raw_config(self) -> dict[str, Any]:
        """config.json as a dict (validated once, with errors naming the file)."""
        if self._raw_config is None:
            cfg_path = self._dir / "config.json"
            if not cfg_path.is_file():
                raise ValueError(f"{cfg_path} does not exist; a Hugging Face model directory needs a config.json")
            try:
                data = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError(f"{cfg_path} must hold a JSON object, found {type(data).__name__}")
            self._raw_config = data
        return self._raw_config

    def load_hf_config(self) -> Any:
        raw = self.raw_config()
        if "model_type" not in raw:
            raise ValueError(
                f"{self._dir / 'config.json'} has no 'model_type' key, so transformers cannot tell which "
                'architecture it describes (expected e.g. "model_type": "llama")'
            )
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self._dir), trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            raise ValueError(f"{self._dir / 'config.json'} could not be read by transformers: {exc}") from exc

    def quantization(self) -> tuple[str, dict[str, Any]] | None:
        qcfg = self.raw_config().get("quantization_config")
        if not qcfg:
            return None
        method = qcfg.get("quant_method")
        if not method:
            raise ValueError(f"{self._dir / 'config.json'}: quantization_config has no 'quant_method'")
        return str(method), dict(qcfg)

    # -- weights --------------------------------------------------------------
    def weight_files(self) -> list[Path]:
        """The checkpoint's safetensors files, in load order."""
        index = self._dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index} is malformed (expected a JSON object with 'weight_map'): {exc}") from exc
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self._dir / f).is_file()]
            if missing:
                raise ValueError(f"{index} lists shard files that do not exist: {', '.join(missing)}")
            return [self._dir / f for f in files]
        files = sorted(self._dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {self._dir}; kvik loads safetensors checkpoints only")
        return files

    def iter_weights(self, quantized: bool) -> Iterator[tuple[str, Any]]:
        # Quantized safetensors checkpoints store each method's own tensors
        # (e.g. weight + weight_scale); they pass through by name either way,
        # and the quantization method (or a dequantize transform) makes sense of them.
        from safetensors import safe_open

        for file in self.weight_files():
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, f.get_tensor(name)

    def iter_weights_lazy(self, quantized: bool) -> Iterator[tuple[str, Any]]:
        """Like :meth:`iter_weights`, but each value is a :class:`~kvik.distributed.sharding.LazyTensor`
        read only when (and as far as) it is indexed: a tensor-parallel rank reads just its slices."""
        from safetensors import safe_open

        from kvik.distributed.sharding import LazyTensor

        for file in self.weight_files():
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, LazyTensor(f.get_slice(name))

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files())

    # -- tokenizer --------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self._dir), trust_remote_code=self.trust_remote_code)
        except Exception as exc:
            raise ValueError(f"could not load a tokenizer from {self._dir}: {exc}") from exc

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json as a dict ({} when absent or unreadable)."""
        path = self._dir / "generation_config.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}
