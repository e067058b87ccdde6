"""ParallelState.all_reduce: the platform's faster sum where it takes the input, torch.distributed's otherwise;
and the switch that turns the platform's off (vLLM's disable_custom_all_reduce)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from kvik.config import EngineConfig
from kvik.distributed.parallel_state import ParallelState
from kvik.engine.config_resolution import resolve_config
from kvik.platforms.selector import resolve_platform
from kvik.plugins.manager import get_plugin_manager
from kvik.testing.tiny_models import make_tiny_model


def test_the_platform_sum_is_tried_first_and_may_decline(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def fast(x: torch.Tensor) -> torch.Tensor | None:
        seen.append(x.numel())
        return x * 2 if x.numel() <= 4 else None  # two ranks holding the same x

    def nccl(x: torch.Tensor, group: object = None) -> None:
        x.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", nccl)
    state = ParallelState(tp_size=2, fast_all_reduce=fast)
    small, large = torch.ones(4), torch.ones(8)
    summed = state.all_reduce(small)
    assert summed is not small and torch.equal(summed, torch.full((4,), 2.0)) and torch.equal(small, torch.ones(4))
    assert state.all_reduce(large) is large and torch.equal(large, torch.full((8,), 2.0))  # declined: in place
    assert seen == [4, 8]
    assert ParallelState(tp_size=1, fast_all_reduce=fast).all_reduce(small) is small  # one rank: no sum at all


def test_disable_custom_all_reduce_reaches_the_resolved_config(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "llama", "llama")
    manager = get_plugin_manager()
    platform = resolve_platform("cpu", manager)
    on = resolve_config(EngineConfig(model=str(path)), platform, manager).config
    off = resolve_config(EngineConfig(model=str(path), disable_custom_all_reduce=True), platform, manager).config
    assert on.disable_custom_all_reduce is False and off.disable_custom_all_reduce is True


@pytest.mark.parametrize("name", ["disable_custom_all_reduce", "enforce_eager"])
def test_switches_that_are_not_booleans_are_refused_before_anything_loads(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be True or False, got 'yes'"):
        EngineConfig(model="no/such/model", **{name: "yes"})
