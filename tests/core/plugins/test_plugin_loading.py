"""Entry-point discovery, allow/block lists, plugin API versions and misspelled hooks."""

from __future__ import annotations

import logging

import pytest
from kvik.plugins.manager import PluginManager, check_api_compatibility
from kvik.version import PLUGIN_API_VERSION


@pytest.fixture
def three_plugins(fake_module, fakes) -> list:
    """Entry points a, b, c (distributions kvik-a/b/c), each registering one model."""
    for name in "abc":
        fake_module(f"plugin_{name}", **vars(fakes.models_plugin(f"plugin_{name}", f"Arch{name.upper()}")))
    return [fakes.EntryPoint(name, f"plugin_{name}", f"kvik-{name}") for name in "abc"]


def test_entry_points_load_with_their_distribution(fake_entry_points, three_plugins) -> None:
    fake_entry_points(*three_plugins)
    manager = PluginManager()
    assert manager.plugins() == [("a", "kvik-a"), ("b", "kvik-b"), ("c", "kvik-c")]
    assert manager.models.entry("ArchB").distribution == "kvik-b"
    assert manager.failures == []


def test_import_failure_warns_with_distribution_and_traceback(
    fake_entry_points, three_plugins, fake_module, fakes, caplog: pytest.LogCaptureFixture
) -> None:
    broken = fakes.EntryPoint("broken", "kvik_tests_missing_module", "kvik-broken")
    fake_entry_points(three_plugins[0], broken, three_plugins[1])
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        manager = PluginManager()
    assert manager.models.names() == ["ArchA", "ArchB"]  # the others load
    (failure,) = manager.failures
    assert (failure.plugin, failure.distribution) == ("broken", "kvik-broken")
    assert "Traceback" in failure.reason and "ModuleNotFoundError" in failure.reason
    record = next(r for r in caplog.records if "broken" in r.getMessage())
    assert record.levelno == logging.WARNING
    assert "kvik-broken" in record.getMessage() and "Traceback" in record.getMessage()


def test_allow_list_loads_only_named_plugins(monkeypatch, fake_entry_points, three_plugins) -> None:
    fake_entry_points(*three_plugins)
    monkeypatch.setenv("KVIK_PLUGINS", "a, kvik-c")  # entry-point or distribution names
    manager = PluginManager()
    assert manager.models.names() == ["ArchA", "ArchC"]
    assert [(s.plugin, s.reason) for s in manager.skipped] == [("b", "not listed in KVIK_PLUGINS")]


def test_allow_list_typo_is_reported(monkeypatch, fake_entry_points, three_plugins, caplog) -> None:
    fake_entry_points(*three_plugins)
    monkeypatch.setenv("KVIK_PLUGINS", "a,cpuu")
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        manager = PluginManager()
    assert manager.models.names() == ["ArchA"]
    assert "KVIK_PLUGINS names cpuu, which no installed kvik plugin provides" in caplog.text


def test_block_list_skips_named_plugins(monkeypatch, fake_entry_points, three_plugins) -> None:
    fake_entry_points(*three_plugins)
    monkeypatch.setenv("KVIK_DISABLE_PLUGINS", "b")
    manager = PluginManager()
    assert manager.models.names() == ["ArchA", "ArchC"]
    assert [(s.plugin, s.distribution, s.reason) for s in manager.skipped] == [
        ("b", "kvik-b", "listed in KVIK_DISABLE_PLUGINS")
    ]


def test_block_list_wins_over_allow_list(monkeypatch, fake_entry_points, three_plugins) -> None:
    fake_entry_points(*three_plugins)
    monkeypatch.setenv("KVIK_PLUGINS", "a,b")
    monkeypatch.setenv("KVIK_DISABLE_PLUGINS", "kvik-b")
    assert PluginManager().models.names() == ["ArchA"]


def test_one_entry_point_name_from_two_distributions(fake_entry_points, three_plugins, fakes) -> None:
    clash = fakes.EntryPoint("a", "plugin_b", "kvik-impostor")
    fake_entry_points(three_plugins[0], clash, three_plugins[0])  # a duplicate of kvik-a itself is fine
    manager = PluginManager()
    assert manager.models.names() == ["ArchA"]
    (failure,) = manager.failures
    assert failure.distribution == "kvik-impostor" and "already used by kvik-a" in failure.reason


# -- plugin API version --------------------------------------------------------


def test_incompatible_api_range_is_refused_naming_both_versions(fresh_manager, fakes, caplog) -> None:
    plugin = fakes.make_plugin("future", api=">=3.0,<4", kvik_register_models=lambda register: None)
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        assert not fresh_manager.register(plugin, "future", "kvik-future")
    reason = fresh_manager.failures[0].reason
    assert ">=3.0,<4" in reason and f"provides {PLUGIN_API_VERSION}" in reason
    assert "kvik-future" in caplog.text
    assert not fresh_manager.pm.has_plugin("future")


def test_missing_api_declaration_is_refused(fresh_manager, fakes) -> None:
    plugin = fakes.make_plugin("old", api=None, kvik_register_models=lambda register: register("A", "m:A"))
    assert not fresh_manager.register(plugin, "old")
    assert fresh_manager.models.names() == []
    assert "declares no KVIK_PLUGIN_API" in fresh_manager.failures[0].reason
    assert f">={PLUGIN_API_VERSION},<3" in fresh_manager.failures[0].reason  # what to write


@pytest.mark.parametrize("declared", [">=2.0,<3", ">=2", "~=2.0", "==2.*"])
def test_compatible_api_ranges_load(declared: str) -> None:
    assert PLUGIN_API_VERSION.startswith("2.")  # these cases are written for API 2.x
    assert check_api_compatibility("p", type("P", (), {"KVIK_PLUGIN_API": declared})) is None


def test_invalid_api_range_is_refused(fresh_manager, fakes) -> None:
    assert not fresh_manager.register(fakes.make_plugin("weird", api="version one"), "weird")
    assert "invalid KVIK_PLUGIN_API 'version one'" in fresh_manager.failures[0].reason


# -- misspelled hooks ----------------------------------------------------------


def test_misspelled_hookimpl_fails_loudly_with_a_suggestion(fresh_manager, fakes, caplog) -> None:
    plugin = fakes.make_plugin("typo", kvik_register_modles=lambda register: register("A", "m:A"))
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        assert not fresh_manager.register(plugin, "typo", "kvik-typo")
    reason = fresh_manager.failures[0].reason
    assert "unknown hook 'kvik_register_modles'" in reason and "did you mean 'kvik_register_models'" in reason
    assert not fresh_manager.pm.has_plugin("typo")
    # A refused plugin leaves the manager usable for the next one.
    assert fresh_manager.register(fakes.models_plugin("ok", "B"), "ok")
    assert fresh_manager.models.names() == ["B"]


def test_wrong_hook_arguments_are_refused(fresh_manager, fakes) -> None:
    plugin = fakes.make_plugin("args", kvik_register_models=lambda registr: None)
    assert not fresh_manager.register(plugin, "args")
    assert "registr" in fresh_manager.failures[0].reason


def test_hook_named_function_without_hookimpl_warns(fresh_manager, fakes, caplog) -> None:
    plugin = fakes.make_plugin("forgot")
    plugin.kvik_register_models = lambda register: register("A", "m:A")
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        assert fresh_manager.register(plugin, "forgot")
    assert "defines kvik_register_models() without @hookimpl" in caplog.text
