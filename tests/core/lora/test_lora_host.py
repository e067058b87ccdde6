"""The adapter's host form and slot fill: the same slot bytes as the per-module reference, read once, off the step."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kvik import LLM, LoRARequest, SamplingParams
from kvik.layers.linear import Linear
from kvik.lora import slots as slots_module
from kvik.lora.adapter import _KEY, check_adapter
from kvik.lora.host import read_host_adapter
from kvik.lora.layers import WrappedModel, wrap_model, write_slot
from kvik.testing.tiny_lora import write_random_adapter
from lora_world import LoRAWorld
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 32, 4, 2, 48, 3
CONFIG = SimpleNamespace(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         intermediate_size=INTER, num_hidden_layers=LAYERS)  # fmt: skip


def _wrapped(max_loras: int, max_rank: int, dtype: torch.dtype) -> WrappedModel:
    hd = HIDDEN // HEADS
    root = nn.Module()
    root.model = nn.Module()
    layers = []
    for _ in range(LAYERS):
        m = nn.Module()
        m.self_attn, m.mlp = nn.Module(), nn.Module()
        m.self_attn.qkv_proj = Linear(HIDDEN, [HEADS * hd, KV_HEADS * hd, KV_HEADS * hd], dtype=dtype)
        m.self_attn.o_proj = Linear(HEADS * hd, HIDDEN, dtype=dtype)
        m.mlp.gate_up_proj = Linear(HIDDEN, [INTER, INTER], dtype=dtype)
        m.mlp.down_proj = Linear(INTER, HIDDEN, dtype=dtype)
        layers.append(m)
    root.model.layers = nn.ModuleList(layers)
    return wrap_model(root, max_loras, max_rank, 8)


def _expected(wrapped: WrappedModel, path: Path, scaling: float, max_rank: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Layer name -> its slot's (A, B) as the old per-module copies built them (A cast, B scaled in float32)."""
    by_layer = {id(t.layer): name for name, t in wrapped.targets.items() if t.shard is None}
    out = {name: (torch.zeros_like(wrapped.targets[name].layer.lora_a[0]),
                  torch.zeros_like(wrapped.targets[name].layer.lora_b[0])) for name in by_layer.values()}  # fmt: skip
    for key, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        match = _KEY.match(key)
        assert match is not None
        target = wrapped.targets[match["module"]]
        a, b = out[by_layer[id(target.layer)]]
        if match["ab"] == "A":
            rank = tensor.shape[0]
            for k in range(len(target.layer.lora_shard_starts)) if target.shard is None else (target.shard,):
                a[k * max_rank : k * max_rank + rank] = tensor.to(dtype)
        else:
            rows = target.layer.shard_rows(target.shard)
            b[rows, : tensor.shape[1]] = (tensor.to(torch.float32) * scaling).to(dtype)
    return out


def _fused_adapter(path: Path, rank: int) -> Path:
    """A Phi-3-style checkpoint: LoRA on the fused ``qkv_proj`` / ``gate_up_proj`` of layer 1 only."""
    path.mkdir()
    hd = HIDDEN // HEADS
    qkv, gate_up = (HEADS + 2 * KV_HEADS) * hd, 2 * INTER
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for leaf, out_f, part in (("qkv_proj", qkv, "self_attn"), ("gate_up_proj", gate_up, "mlp")):
        prefix = f"base_model.model.model.layers.1.{part}.{leaf}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 3 * rank}))
    return path


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize(
    ("kind", "file_dtype", "slot_dtype", "rank"),
    [("all", "bfloat16", torch.bfloat16, 8), ("all", "float32", torch.bfloat16, 4), ("qv_down", "float32", torch.float32, 8),
     ("qv_down", "bfloat16", torch.float16, 2), ("fused", "float32", torch.bfloat16, 4)],
)  # fmt: skip
def test_slot_fill_equals_the_per_module_reference(tmp_path: Path, kind: str, file_dtype: str, slot_dtype: torch.dtype, rank: int, staged: bool) -> None:  # fmt: skip
    max_rank = 8
    wrapped = _wrapped(max_loras=3, max_rank=max_rank, dtype=slot_dtype)
    if staged:  # what wrap_model gives slots off the CPU: one full-rank slot, here full of NaN leftovers
        elements = sum(g.a[:, 0].numel() + g.b[:, 0].numel() for g in wrapped.groups)
        wrapped.staging = torch.full((elements,), float("nan"), dtype=slot_dtype)
    if kind == "fused":
        path = _fused_adapter(tmp_path / "a", rank)
    else:
        targets = ("q_proj", "v_proj", "down_proj") if kind == "qv_down" else None
        kw = {"targets": targets} if targets else {}
        path = write_random_adapter(tmp_path / "a", CONFIG, rank=rank, alpha=3 * rank, dtype=file_dtype, std=0.3, **kw)
    shapes = {name: (t.in_features, t.out_features) for name, t in wrapped.targets.items()}
    info = check_adapter(str(path), max_rank, shapes)
    host = read_host_adapter(info, wrapped, slot_dtype, pin=False)
    for group in wrapped.groups:  # a previous adapter's leftovers everywhere: the fill must clear them
        group.a.normal_()
        group.b.normal_()
    write_slot(wrapped, 1, host)
    want = _expected(wrapped, path, info.scaling, max_rank, slot_dtype)
    for name, (a, b) in want.items():
        layer = wrapped.targets[name].layer
        assert torch.equal(layer.lora_a[1], a), name
        assert torch.equal(layer.lora_b[1], b), name
        assert layer.lora_a[0].abs().sum() > 0 and layer.lora_b[2].abs().sum() > 0  # other slots untouched


class _CountCopies(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in ("copy_", "zero_", "fill_"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_prefetch_starts_at_add_request_and_the_step_only_copies(lora_world: LoRAWorld, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    llm = LLM(str(lora_world.base), enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64, max_model_len=128)
    engine = llm.llm_engine
    slots = engine.runner.lora  # type: ignore[attr-defined]
    lora = lora_world.loras[1]  # every projection, rank 8
    engine.add_request("r0", [5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0.0), lora_request=lora)
    # Admission started the read, before any step scheduled the request.
    reading = slots._reading[lora.lora_int_id][1]
    reading.result(timeout=60)

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("the engine step read the adapter from disk")

    monkeypatch.setattr(slots_module, "read_host_adapter", no_disk)
    monkeypatch.setattr("kvik.lora.host._read_into", no_disk)
    counter = _CountCopies()
    real_assign = slots.assign

    def counted_assign(requests: list[LoRARequest]) -> dict[int, int]:
        with counter:
            return real_assign(requests)

    monkeypatch.setattr(slots, "assign", counted_assign)
    while engine.has_unfinished_requests():
        engine.step()
    assert slots.num_prefetched == slots.num_loads == 1
    # One copy per stacked tensor (A and B of each projection kind), not one per layer and module.
    groups = len(slots.wrapped.groups)
    assert counter.calls.count("copy_") == 2 * groups < len(slots.wrapped.targets)


def test_a_full_host_cache_makes_room_for_the_admitted_adapter(lora_world: LoRAWorld) -> None:
    # A host cache of 2 and three adapters in turn: admitting the third drops the least recently used
    # host copy (a slot keeps its weights), so every adapter is still read in the background, never on the step.
    llm = LLM(str(lora_world.base), enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=8,
              num_kv_blocks=64, max_model_len=128)  # fmt: skip
    slots = llm.llm_engine.runner.lora  # type: ignore[attr-defined]
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    for k in (0, 1, 2, 0):
        lora = lora_world.loras[k]
        out = llm.generate(lora_world.prompts[:1], greedy, use_tqdm=False, lora_request=lora)
        assert list(out[0].outputs[0].token_ids) == lora_world.lora_tokens[k][0][:2]
        assert len(slots.cpu) + len(slots._reading) <= 2
    assert slots.num_prefetched == slots.num_disk_reads == 4  # every read ran off the step (adapter 0 twice)
    assert slots.step_read_s == 0.0
