"""The example of docs/plugins.md "Writing a platform": a platform whose runner is built on the kit.

The runner subclasses :class:`kvik.worker.kit.KitModelRunner`, which owns the step
loop and the block tables; it supplies the device work through three hooks:
``prepare_inputs`` (the kit's numpy layout -> torch tensors + attention
metadata), ``run_model`` and ``sample`` (greedy only, to stay short). The model
is kvik's torch model with the ``torch_ref`` attention backend, on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvik.attention.backend import AttentionMetadata
from kvik.attention.torch_ref import TorchRefAttentionBackend
from kvik.config import EngineConfig, ModelConfig
from kvik.models.interface import ModelBuildContext
from kvik.models.loader import load_model
from kvik.models.model_config import resolve_format
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.plugins.hookspecs import hookimpl
from kvik.worker.interface import StepHandle
from kvik.worker.kit import KitModelRunner, StepLayout, assemble_output

KVIK_PLUGIN_API = ">=2.0,<3"


@dataclass(slots=True)
class Inputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: AttentionMetadata[torch.Tensor]


class MinimalRunner(KitModelRunner[Inputs, torch.Tensor]):
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        super().__init__(config.block_size)  # type: ignore[arg-type]
        self.config, self.model_config = config, model_config
        self.dtype = getattr(torch, model_config.dtype)
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []

    # -- set-up: build the model, size and allocate the paged KV cache ----------------------
    def load_model(self) -> None:
        mc = self.model_config
        ctx = ModelBuildContext(mc, self.dtype, torch.device("cpu"), TorchRefAttentionBackend)
        self.model = load_model(mc, ctx, resolve_format(str(self.config.model)), quantized=False)

    def weight_bytes(self) -> int:
        assert self.model is not None
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        mc = self.model_config
        return TorchRefAttentionBackend.kv_cache_shape(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)

    def kv_block_bytes(self, block_size: int) -> int:
        return int(torch.Size(self._cache_shape(1)).numel()) * self.dtype.itemsize * self.model_config.num_layers

    def profile(self) -> int:
        return 64 << 20  # a fixed activation budget: enough for the tiny test models

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = [
            torch.zeros(self._cache_shape(num_blocks), dtype=self.dtype) for _ in range(self.model_config.num_layers)
        ]

    # -- the kit's hooks ---------------------------------------------------------------------
    def prepare_inputs(self, layout: StepLayout) -> Inputs:
        metadata = AttentionMetadata(
            num_tokens=layout.num_tokens,
            num_reqs=layout.num_reqs,
            query_start_loc=torch.from_numpy(layout.query_start_loc),
            seq_lens=torch.from_numpy(layout.seq_lens),
            block_tables=torch.from_numpy(layout.block_table),
            slot_mapping=torch.from_numpy(layout.slot_mapping),
            block_size=layout.block_size,
            max_query_len=layout.max_query_len,
            max_seq_len=layout.max_seq_len,
            query_lens_cpu=layout.query_lens_cpu,
            seq_lens_cpu=layout.seq_lens_cpu,
        )
        TorchRefAttentionBackend.prepare(metadata)
        return Inputs(torch.from_numpy(layout.token_ids), torch.from_numpy(layout.positions), metadata)

    @torch.inference_mode()
    def run_model(self, inputs: Inputs) -> torch.Tensor:
        assert self.model is not None
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.metadata)

    @torch.inference_mode()
    def sample(self, hidden: torch.Tensor, layout: StepLayout, structured: object) -> StepHandle:
        assert self.model is not None
        logits = self.model.compute_logits(hidden[torch.from_numpy(layout.logits_indices)])  # type: ignore[operator]
        return StepHandle.done(assemble_output(layout.sampling_requests(), logits.argmax(dim=-1).numpy()))


class MinimalPlatform(Platform):
    name = "minimal"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 32, free=1 << 31)

    def create_model_runner(self, config: EngineConfig, model_config: ModelConfig) -> MinimalRunner:
        return MinimalRunner(config, model_config)


@hookimpl
def kvik_register_platforms(register) -> None:  # type: ignore[no-untyped-def]
    register("minimal", f"{__name__}:MinimalPlatform")
