"""The structured-output backend seam: the hook, the built-in xgrammar registration, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from kvik import builtin
from kvik.plugins.hookspecs import hookimpl
from kvik.plugins.manager import PluginManager
from kvik.sampling_params import SamplingParams
from kvik.structured.backend import StructuredOutputBackend
from kvik.structured.manager import StructuredOutputManager


class _AllowList:
    """A matcher allowing a fixed token set once, then terminating."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.done = tokens, False

    def accept_token(self, token_id: int) -> bool:
        self.done = token_id in self.tokens
        return self.done

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        bitmask[row] = 0
        for t in self.tokens:
            bitmask[row, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))

    def is_terminated(self) -> bool:
        return self.done


class TokenSetBackend(StructuredOutputBackend):
    """A toy backend: guided_choice of decimal token ids."""

    name = "token_set"

    def __init__(self, tokenizer, vocab_size, eos_token_ids) -> None:
        self.vocab_size = vocab_size

    def compile(self, kind, spec):
        if kind != "choice":
            raise ValueError(f"token_set supports guided_choice only, not {kind}")
        return [int(c) for c in spec]

    def new_matcher(self, compiled):
        return _AllowList(compiled)

    def allocate_bitmask(self, rows):
        return np.zeros((rows, (self.vocab_size + 31) // 32), dtype=np.int32)


class MissingLibraryBackend(TokenSetBackend):
    def __init__(self, tokenizer, vocab_size, eos_token_ids) -> None:
        raise ImportError("backend 'missing' needs the frobnicate package: `pip install frobnicate`")


class _Plugin:
    KVIK_PLUGIN_API = ">=2.0,<3"

    @staticmethod
    @hookimpl
    def kvik_register_structured_output_backends(register) -> None:
        register("token_set", f"{__name__}:TokenSetBackend")
        register("missing", f"{__name__}:MissingLibraryBackend")


def _manager() -> PluginManager:
    pm = PluginManager(load_entrypoints=False)
    assert pm.register(builtin, "builtin") and pm.register(_Plugin, "toy")
    return pm


def test_builtin_registers_xgrammar() -> None:
    assert set(_manager().structured_output_backends.names()) >= {"xgrammar", "token_set", "missing"}


def test_a_plugin_backend_drives_the_manager() -> None:
    manager = StructuredOutputManager(object(), 64, frozenset({0}), _manager(), backend_name="token_set")
    manager.add_request("a", SamplingParams(guided_choice=["5", "40"]))
    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

    params = SamplingParams()
    step = manager.start_step(SchedulerOutput([ScheduledRequest("a", [1], 0, [1], True, params)], 1))
    assert step is not None and step.request_ids == ["a"]
    bits = step.bitmask()
    allowed = [t for t in range(64) if (int(bits[0, t // 32]) >> (t % 32)) & 1]
    assert allowed == [5, 40]


def test_bitmasks_are_filled_off_the_engine_thread(monkeypatch) -> None:
    import threading

    from kvik.scheduling.output import ScheduledRequest, SchedulerOutput

    threads = []
    original = _AllowList.fill_bitmask

    def spy(self, bitmask, row):
        threads.append(threading.current_thread().name)
        original(self, bitmask, row)

    monkeypatch.setattr(_AllowList, "fill_bitmask", spy)
    manager = StructuredOutputManager(object(), 64, frozenset(), _manager(), backend_name="token_set")
    for rid in ("a", "b"):
        manager.add_request(rid, SamplingParams(guided_choice=["7"]))
    scheduled = [ScheduledRequest(r, [1], 0, [1], True, SamplingParams()) for r in ("a", "b")]
    step = manager.start_step(SchedulerOutput(scheduled, 2))
    assert step is not None and step.bitmask().shape == (2, 2)
    assert threads == ["kvik-grammar_0"] * 2
    # The matchers advance after sampling; a terminated grammar is reported and forgotten.
    from kvik.request import Request

    request = Request("a", [1], SamplingParams(), max_tokens=4)
    request.append_output_token(7)
    assert manager.accept([request]) == ["a"]
    assert manager.start_step(SchedulerOutput(scheduled, 2)).request_ids == ["b"]
    manager.shutdown()


def test_missing_backend_library_is_a_clear_error() -> None:
    manager = StructuredOutputManager(object(), 64, frozenset(), _manager(), backend_name="missing")
    with pytest.raises(ValueError, match="pip install frobnicate"):
        manager.compile(SamplingParams(guided_regex="a+"))


def test_missing_xgrammar_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar -> ImportError
    manager = StructuredOutputManager(object(), 64, frozenset(), _manager())
    with pytest.raises(ValueError, match="pip install xgrammar"):
        manager.compile(SamplingParams(guided_regex="a+"))
