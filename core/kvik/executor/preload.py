"""Imported once by the multiprocess executor's fork server: what every worker needs, ready before it forks.

torch, transformers (the model's config class), the torch runner and the process-wide plugin
manager with its registries built (entry points loaded): a forked worker inherits them all. Nothing
here touches a device, so forking afterwards is safe.
"""

from __future__ import annotations

import torch  # noqa: F401
import transformers  # noqa: F401

import kvik.executor.worker
import kvik.worker.torch_runner  # noqa: F401
from kvik.plugins.manager import get_plugin_manager

for _registry in (get_plugin_manager().platforms, get_plugin_manager().models):
    _registry.names()
