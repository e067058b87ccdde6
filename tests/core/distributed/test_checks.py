"""Start-up checks of a parallel layout (one ValueError naming every problem, before any worker starts)
and the partitioning arithmetic the parallel layers rely on."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvik.config import EngineConfig
from kvik.distributed.parallel_state import stage_layers
from kvik.distributed.sharding import first_kv_head, kv_heads_per_rank
from kvik.engine.config_resolution import resolve_config
from kvik.testing.host_platform import HostCPUPlatform


class _GlooHost(HostCPUPlatform):
    distributed_backend: ClassVar[str | None] = "gloo"


class _TwoDevices(_GlooHost):
    def device_count(self) -> int | None:
        return 2


def _resolve(model: Any, manager: Any, platform: Any = None, **kwargs: Any) -> Any:
    return resolve_config(EngineConfig(model=str(model), **kwargs), platform or _GlooHost(), manager).config


def test_a_valid_layout_resolves_to_the_mp_executor(tiny_model_dir, kvik_plugin_manager) -> None:
    config = _resolve(tiny_model_dir("llama"), kvik_plugin_manager, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert (config.world_size, config.distributed_executor_backend) == (4, "mp")
    assert _resolve(tiny_model_dir("llama"), kvik_plugin_manager).distributed_executor_backend == "uni"


def test_every_divisibility_problem_is_named_at_once(tiny_model_dir, kvik_plugin_manager) -> None:
    # 4 heads, 2 kv heads, vocab 512, intermediate 128, 2 layers: none divisible by 3.
    with pytest.raises(ValueError) as info:
        _resolve(tiny_model_dir("llama"), kvik_plugin_manager, tensor_parallel_size=3, pipeline_parallel_size=3)
    message = str(info.value)
    for part in ("4 attention heads", "2 key/value heads", "vocabulary (512)", "intermediate size (128)",
                 "pipeline_parallel_size=3 exceeds the model's 2 layers"):  # fmt: skip
        assert part in message, message
    assert message.startswith("cannot run tensor_parallel_size=3, pipeline_parallel_size=3")


def test_unsupported_architecture_platform_executor_and_device_count(tiny_model_dir, kvik_plugin_manager) -> None:
    gemma = tiny_model_dir("gemma2", head_dim=16)
    with pytest.raises(ValueError, match="Gemma2ForCausalLM does not support tensor parallelism yet"):
        _resolve(gemma, kvik_plugin_manager, tensor_parallel_size=2)
    llama = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="platform 'host-cpu' runs one device per engine"):
        _resolve(llama, kvik_plugin_manager, HostCPUPlatform(), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="the 'uni' executor runs one rank, not 2"):
        _resolve(llama, kvik_plugin_manager, tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="distributed_executor_backend='nope' is not registered"):
        _resolve(llama, kvik_plugin_manager, tensor_parallel_size=2, distributed_executor_backend="nope")
    with pytest.raises(ValueError, match=r"4 ranks .* need 4 host-cpu devices; this host has 2"):
        _resolve(llama, kvik_plugin_manager, _TwoDevices(), tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"replica at device 2 needs devices 2..3; this host has 2"):
        _resolve(llama, kvik_plugin_manager, _TwoDevices(), tensor_parallel_size=2, data_parallel_rank=1)
    # A later data-parallel replica on a device of its own runs its rank in a worker process.
    replica = _resolve(llama, kvik_plugin_manager, _TwoDevices(), data_parallel_rank=1)
    assert (replica.device_offset, replica.distributed_executor_backend) == (1, "mp")
    # Ray places ranks on any host of its cluster: no local device count applies.
    _resolve(llama, kvik_plugin_manager, _TwoDevices(), tensor_parallel_size=4, distributed_executor_backend="ray")


@given(st.integers(1, 16), st.integers(1, 8), st.integers(1, 64))
def test_every_query_head_finds_its_kv_head_on_its_rank(kv: int, tp_pow: int, group: int) -> None:
    tp = [1, 2, 4, 8, 16, 3, 6, 12][tp_pow - 1]
    heads = kv * group
    if heads % tp or ((kv % tp) if kv >= tp else (tp % kv)):
        return  # refused at start-up (test above)
    local_kv = kv_heads_per_rank(kv, tp)
    local_heads = heads // tp
    for rank in range(tp):
        start = first_kv_head(kv, tp, rank)
        for h in range(rank * local_heads, (rank + 1) * local_heads):
            # The attention backend maps local query head i to local kv head i // (local_heads / local_kv).
            local_q = h - rank * local_heads
            assert start + local_q // (local_heads // local_kv) == h // group


@given(st.integers(1, 200), st.integers(1, 16))
def test_pipeline_stages_cover_every_layer_once(layers: int, stages: int) -> None:
    if stages > layers:
        return
    ranges = [stage_layers(layers, stages, s) for s in range(stages)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(end > start for start, end in ranges)
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
