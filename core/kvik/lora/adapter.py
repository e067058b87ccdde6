"""PEFT LoRA checkpoints: read ``adapter_config.json`` + ``adapter_model.safetensors``, check, load.

A checkpoint is checked against the base model's projections before any request
runs under it (:func:`check_adapter`, cheap: the config and the safetensors
header only), so a bad path, config or rank is a ``ValueError`` naming the
problem at admission, never a failure inside an engine step. :mod:`kvik.lora.host`
reads the weights into host memory (scaling folded into ``B``).

Supported: LoRA on the attention and MLP projections (q/k/v/o, gate/up/down, or the
fused qkv/gate_up of checkpoints that have them), any rank up to ``max_lora_rank``,
``lora_alpha`` scaling (``alpha / r``) and rsLoRA (``alpha / sqrt(r)``). Refused with
a message: DoRA, ``modules_to_save``, embedding / lm_head adapters (extra vocab),
biases, per-module rank or alpha patterns.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 256  # the largest max_lora_rank kvik accepts
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors dtypes an adapter's weights may have

# base_model.model.<module path>.<leaf>.lora_A.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A checked adapter: its rank, scaling and the base modules it adapts."""

    path: str
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    modules: tuple[str, ...]  # PEFT module paths, e.g. "model.layers.0.self_attn.q_proj"


def _fail(path: str, message: str) -> ValueError:
    return ValueError(f"LoRA adapter at {path!r}: {message}")


def read_config(path: str) -> dict[str, Any]:
    """The adapter's PEFT config (ValueError naming a missing directory / file or bad JSON)."""
    folder = Path(path)
    if not folder.is_dir():
        raise _fail(path, "no such directory; lora_path must be a PEFT adapter directory")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise _fail(path, f"{CONFIG_FILE} is missing (is this a PEFT LoRA adapter directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise _fail(path, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _fail(path, f"{CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(path: str, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """(rank, scaling) from a PEFT LoRA config; ValueError for what kvik cannot run."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(path, f"peft_type is {peft_type!r}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise _fail(path, "DoRA adapters (use_dora=true) are not supported; use a plain LoRA adapter")
    if config.get("modules_to_save"):
        raise _fail(
            path,
            f"modules_to_save={config['modules_to_save']!r} is not supported (it replaces whole base modules, "
            "e.g. an extended vocabulary); train the adapter without it",
        )
    if config.get("bias", "none") not in ("none", None):
        raise _fail(path, f"bias={config['bias']!r} is not supported; only bias='none' adapters run")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _fail(path, f"{key} (per-module ranks / alphas) is not supported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _fail(path, f"'r' must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _fail(
            path, f"rank {rank} exceeds max_lora_rank={max_rank}; start the engine with max_lora_rank >= {rank}"
        )
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise _fail(path, f"lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def safetensors_header(file: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(first data byte, tensor name -> {dtype, shape, data_offsets}) of a safetensors file, its
    ``__metadata__`` left out. OSError / ValueError when it cannot be read as one."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _header_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors header, without reading the tensors."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise _fail(path, f"{WEIGHTS_FILE} is missing (adapter_model.bin checkpoints are not supported)")
    try:
        _, header = safetensors_header(weights)
    except (OSError, ValueError) as exc:
        raise _fail(path, f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})") from None
    for name, meta in header.items():
        if meta.get("dtype") not in WEIGHT_DTYPES:
            raise _fail(path, f"tensor {name!r} is {meta.get('dtype')}; adapter weights must be one of {WEIGHT_DTYPES}")
    return {k: v["shape"] for k, v in header.items()}


def check_adapter(path: str, max_rank: int, targets: dict[str, tuple[int, int]]) -> AdapterInfo:
    """Check a PEFT checkpoint against the base model's projections.

    ``targets``: PEFT module path -> (in_features, out_features) of every projection
    kvik can adapt. Raises ``ValueError`` naming the first problem found.
    """
    config = read_config(path)
    rank, scaling = _check_config(path, config, max_rank)
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in _header_shapes(path).items():
        if "lora_embedding" in name or "lora_magnitude_vector" in name:
            what = "DoRA magnitudes" if "magnitude" in name else "embedding adapters (extra vocabulary)"
            raise _fail(path, f"{what} are not supported (tensor {name!r})")
        match = _KEY.match(name)
        if match is None:
            raise _fail(
                path, f"unexpected tensor {name!r}: only lora_A / lora_B weights of linear layers are supported"
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = shape
    if not pairs:
        raise _fail(path, f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, ab in sorted(pairs.items()):
        if module not in targets:
            leaf = module.rsplit(".", 1)[-1]
            kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
            raise _fail(path, f"module {module!r} ({leaf}) cannot be adapted; supported modules: {', '.join(kinds)}")
        if set(ab) != {"A", "B"}:
            raise _fail(path, f"module {module!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        in_f, out_f = targets[module]
        if ab["A"] != [rank, in_f] or ab["B"] != [out_f, rank]:
            raise _fail(
                path,
                f"module {module!r}: lora_A {ab['A']} / lora_B {ab['B']} do not match rank {rank} and the base "
                f"layer ({in_f} -> {out_f}); was the adapter trained for another base model?",
            )
    return AdapterInfo(path=path, rank=rank, scaling=scaling, modules=tuple(sorted(pairs)))
