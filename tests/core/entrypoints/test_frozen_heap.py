"""kvik.entrypoints.frozen_heap: the heap alive before an LLM call is out of the collector's sight while it runs."""

from __future__ import annotations

import gc

import kvik
import pytest
from kvik.entrypoints import frozen_heap as frozen_heap_module
from kvik.entrypoints.frozen_heap import frozen_heap


def test_frozen_inside_and_given_back_after() -> None:
    assert gc.get_freeze_count() == 0
    before = [object() for _ in range(1000)]
    with frozen_heap():
        assert gc.get_freeze_count() >= len(before)
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a failed call unfreezes too")
    assert gc.get_freeze_count() == 0


def test_young_collections_are_rarer_inside_and_as_before_after() -> None:
    before = gc.get_threshold()
    with frozen_heap():
        with frozen_heap():
            assert gc.get_threshold() == (frozen_heap_module.YOUNG_COLLECTION_THRESHOLD, *before[1:])
        assert gc.get_threshold()[0] == frozen_heap_module.YOUNG_COLLECTION_THRESHOLD  # the outer block still runs
    assert gc.get_threshold() == before
    gc.set_threshold(50_000, *before[1:])  # a caller's own higher threshold is kept
    try:
        with frozen_heap():
            assert gc.get_threshold()[0] == 50_000
    finally:
        gc.set_threshold(*before)


def test_freeze_for_life_freezes_and_keeps_young_collections_rare() -> None:
    before = gc.get_threshold()
    try:
        frozen_heap_module.freeze_for_life()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (frozen_heap_module.YOUNG_COLLECTION_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_blocks_nest_and_the_outermost_unfreezes() -> None:
    with frozen_heap():
        with frozen_heap():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the outer block still runs
    assert gc.get_freeze_count() == 0


def test_a_process_freeze_stays_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frozen_heap_module, "_frozen_by_process", False)  # restored after the test
    gc.freeze()  # as `kvik serve` does after start-up
    try:
        frozen = gc.get_freeze_count()
        counted = []
        monkeypatch.setattr(gc, "get_freeze_count", lambda: counted.append(1) or frozen)
        for _ in range(3):
            with frozen_heap():
                pass
        monkeypatch.undo()
        assert gc.get_freeze_count() >= frozen > 0
        # Counted once: the count walks every frozen object (tens of ms for a large heap).
        assert counted == [1]
    finally:
        gc.unfreeze()


def test_generate_steps_run_with_the_heap_frozen(tiny_model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    llm = kvik.LLM(str(tiny_model_dir("llama")), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)
    engine = llm.llm_engine
    seen: list[int] = []
    step = engine.step

    def counting_step():  # type: ignore[no-untyped-def]
        seen.append(gc.get_freeze_count())
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    out = llm.generate([[1, 2, 3], [4, 5]], kvik.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert seen and min(seen) > 10_000  # torch, transformers and the engine: a large heap
    assert gc.get_freeze_count() == 0
