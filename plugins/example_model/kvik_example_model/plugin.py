"""The plugin module kvik loads through the ``kvik`` entry-point group.

It only names classes: ``kvik_example_model.model`` (and torch) is imported
when a checkpoint with this architecture is loaded, not when kvik starts.
"""

from __future__ import annotations

from kvik.plugins.hookspecs import RegisterFn, hookimpl

KVIK_PLUGIN_API = ">=2.0,<3"


@hookimpl
def kvik_register_models(register: RegisterFn) -> None:
    register("ParallelLlamaForCausalLM", "kvik_example_model.model:ParallelLlamaForCausalLM")
