"""datasette-style: every hookspec, with its argument list, is documented in docs/plugins.md."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from kvik.plugins import hookspecs

DOCS = Path(__file__).resolve().parents[3] / "docs" / "plugins.md"


@pytest.mark.parametrize("hook", hookspecs.ALL_HOOKS, ids=lambda h: h.__name__)
def test_hook_is_documented_with_its_signature(hook) -> None:
    args = ", ".join(inspect.signature(hook).parameters)
    heading = f"### `{hook.__name__}({args})`"
    assert heading in DOCS.read_text(), f"docs/plugins.md lacks the section {heading!r}"


def test_every_hookspec_is_in_all_hooks() -> None:
    declared = {name for name, obj in vars(hookspecs).items() if hasattr(obj, "kvik_spec")}
    assert declared == {h.__name__ for h in hookspecs.ALL_HOOKS}


def test_documented_hooks_exist() -> None:
    # A renamed or removed hook must leave the docs too.
    names = {h.__name__ for h in hookspecs.ALL_HOOKS}
    documented = {
        line.split("`")[1].split("(")[0] for line in DOCS.read_text().splitlines() if line.startswith("### `kvik_")
    }
    assert documented == names
