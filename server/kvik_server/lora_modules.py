"""The adapters this server serves by name (``--lora-modules``, ``/v1/load_lora_adapter``).

A request's ``model`` field picks the base model (the served name) or one of these
adapters. Each name gets its own ``lora_int_id`` for the engine. The server counts
the requests in flight per adapter, so unloading one that is in use is refused
(409) instead of pulling it out from under them.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kvik.lora.registry import LoRAInUseError
from kvik.lora.request import LoRARequest

from kvik_server.errors import APIError, bad_request


@dataclass(frozen=True, slots=True)
class LoRAModule:
    name: str
    path: str


def parse_lora_module(text: str) -> LoRAModule:
    """``name=path`` or vLLM's JSON form ``{"name": ..., "path": ...}``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            return LoRAModule(str(data["name"]), str(data["path"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"invalid --lora-modules entry {text!r}: the JSON form needs 'name' and 'path'") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"invalid --lora-modules entry {text!r}; use name=path")
    return LoRAModule(name, path)


class LoRAModules:
    """Adapter name -> LoRARequest, plus in-flight counts."""

    def __init__(self, engine: Any, base_name: str, enabled: bool, allow_updates: bool) -> None:
        self.engine = engine
        self.base_name = base_name
        self.enabled = enabled
        self.allow_updates = allow_updates
        self.adapters: dict[str, LoRARequest] = {}
        self.in_flight: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter ``model`` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.base_name:
            return None
        adapter = self.adapters.get(model)
        if adapter is None:
            served = ", ".join(f"`{n}`" for n in [self.base_name, *self.adapters])
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves {served} (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        return adapter

    def load_static(self, modules: list[LoRAModule]) -> None:
        """``--lora-modules`` at start-up: ValueError naming a bad one (the server does not start)."""
        if modules and not self.enabled:
            raise ValueError("--lora-modules needs --enable-lora")
        for module in modules:
            if module.name == self.base_name or module.name in self.adapters:
                raise ValueError(f"--lora-modules: the name {module.name!r} is used twice (or is the served model's)")
            request = LoRARequest(module.name, next(self._ids), module.path)
            self.engine.check_lora_blocking(request)
            self.adapters[module.name] = request

    async def load(self, name: str, path: str) -> LoRARequest:
        """Check and register an adapter; 400 naming the problem (bad path, config, rank, name)."""
        if not self.enabled:
            raise bad_request("LoRA adapters are off on this server; start it with --enable-lora", code="lora_disabled")
        if not name or not path:
            raise bad_request("both 'lora_name' and 'lora_path' are required", param="lora_name" if not name else "lora_path")
        if name == self.base_name or name in self.adapters:
            raise bad_request(f"the model name `{name}` is already in use; unload it first or pick another name",
                              param="lora_name", code="lora_name_in_use")  # fmt: skip
        request = LoRARequest(name, next(self._ids), path)
        try:
            await self.engine.check_lora(request)
        except ValueError as exc:
            raise bad_request(str(exc), param="lora_path", code="invalid_lora_adapter") from None
        self.adapters[name] = request
        return request

    async def unload(self, name: str) -> None:
        """Forget an adapter: 404 when unknown, 409 while requests run under it."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise APIError(404, f"no LoRA adapter named `{name}` is loaded", param="lora_name", code="lora_not_found")
        if self.in_flight[name]:
            raise APIError(409, f"the LoRA adapter `{name}` has {self.in_flight[name]} request(s) in flight; "
                           "unload it once they finish", param="lora_name", code="lora_in_use")  # fmt: skip
        try:
            await self.engine.remove_lora(adapter.lora_int_id)
        except LoRAInUseError as exc:
            raise APIError(409, str(exc), param="lora_name", code="lora_in_use") from None
        del self.adapters[name]
