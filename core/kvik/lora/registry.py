"""The engine's record of the adapters requests have named: checked once, then trusted by id."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kvik.lora.adapter import AdapterInfo
from kvik.lora.request import LoRARequest

if TYPE_CHECKING:
    from kvik.worker.interface import ModelRunner


class LoRAInUseError(RuntimeError):
    """Removing an adapter that requests still run under."""


class LoRARegistry:
    """Adapter id -> the request that introduced it, plus each checked path's facts.

    ``check`` runs on any thread (request admission); ``remove`` on the engine's.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._lock = threading.Lock()
        self._by_id: dict[int, LoRARequest] = {}
        self._checked: dict[str, AdapterInfo] = {}  # path -> facts

    def check(self, request: LoRARequest) -> AdapterInfo:
        """The adapter's facts; ValueError for a bad checkpoint or an id already naming another adapter."""
        with self._lock:
            known = self._by_id.get(request.lora_int_id)
            info = self._checked.get(request.lora_path)
        if known is not None and (known.lora_path != request.lora_path or known.lora_name != request.lora_name):
            raise ValueError(
                f"lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} ({known.lora_path}); "
                f"give {request.lora_name!r} another id"
            )
        if info is None:
            info = self.runner.check_lora(request.lora_path)  # reads files: outside the lock
        with self._lock:
            self._checked[request.lora_path] = info
            self._by_id.setdefault(request.lora_int_id, request)
        self.runner.prefetch_lora(request)
        return info

    def remove(self, lora_int_id: int, requests_in_flight: int) -> bool:
        """Forget an adapter (False when unknown); LoRAInUseError while requests run under it."""
        with self._lock:
            known = self._by_id.get(lora_int_id)
            if known is None:
                return False
            if requests_in_flight:
                raise LoRAInUseError(
                    f"adapter {known.lora_name!r} has {requests_in_flight} request(s) in flight; "
                    "unload it once they finish"
                )
            del self._by_id[lora_int_id]
            self._checked.pop(known.lora_path, None)
        self.runner.remove_lora(lora_int_id)
        return True

    def list(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_id.values())
