"""Registration hooks fill registries, recording where each entry came from."""

from __future__ import annotations

import logging
import sys

import pytest
from kvik.plugins.manager import PluginManager
from kvik.plugins.registry import PluginError


class Arch1:
    pass


class Arch2:
    pass


def test_registration_records_plugin_and_distribution(fresh_manager: PluginManager, fakes, fake_module) -> None:
    fake_module("fake_models", Arch1=Arch1, Arch2=Arch2)
    assert fresh_manager.register(fakes.models_plugin("mine", "Arch1", "Arch2"), "mine", "kvik-mine")
    entry = fresh_manager.models.entry("Arch1")
    assert (entry.plugin, entry.distribution, entry.target) == ("mine", "kvik-mine", "fake_models:Arch1")
    assert fresh_manager.models.names() == ["Arch1", "Arch2"]
    assert fresh_manager.models.get("Arch2") is Arch2
    assert fresh_manager.plugins() == [("mine", "kvik-mine")]


def test_targets_are_imported_only_when_used(fresh_manager: PluginManager, fakes) -> None:
    fresh_manager.register(fakes.models_plugin("lazy", "Ghost", target_module="kvik_tests_not_a_module"), "lazy")
    assert "Ghost" in fresh_manager.models  # registering imported nothing
    assert "kvik_tests_not_a_module" not in sys.modules
    with pytest.raises(PluginError, match=r"could not import kvik_tests_not_a_module:Ghost for 'Ghost' \(from lazy\)"):
        fresh_manager.models.get("Ghost")


def test_unknown_name_lists_registered_ones(fresh_manager: PluginManager, fakes) -> None:
    fresh_manager.register(fakes.models_plugin("p", "A", "B"), "p")
    with pytest.raises(PluginError, match=r"unknown model architecture 'C'; registered: A, B"):
        fresh_manager.models.get("C")


def test_two_plugins_claiming_one_name_is_an_error_naming_both(
    fresh_manager: PluginManager, fakes, fake_module, caplog: pytest.LogCaptureFixture
) -> None:
    fake_module("fake_models", Arch1=Arch1, Arch2=Arch2)
    fake_module("other_models", Arch1=Arch2)
    fresh_manager.register(fakes.models_plugin("first", "Arch1", "Arch2"), "first", "kvik-first")
    fresh_manager.register(
        fakes.models_plugin("second", "Arch1", target_module="other_models"), "second", "kvik-second"
    )
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        registry = fresh_manager.models
    with pytest.raises(PluginError) as info:
        registry.get("Arch1")
    message = str(info.value)
    assert "kvik-first (fake_models:Arch1)" in message and "kvik-second (other_models:Arch1)" in message
    assert "KVIK_DISABLE_PLUGINS" in message  # the advice
    assert "Arch1" not in registry.names()
    assert registry.get("Arch2") is Arch2  # the rest keep working
    assert list(fresh_manager.conflicts()["model architecture"]) == ["Arch1"]
    assert "kvik-first and kvik-second" in caplog.text


def test_a_raising_registration_hook_registers_nothing_and_others_work(
    fresh_manager: PluginManager, fakes, caplog: pytest.LogCaptureFixture
) -> None:
    def kvik_register_models(register):
        register("Partial", "fake_models:Partial")
        raise RuntimeError("boom in registration")

    fresh_manager.register(fakes.make_plugin("bad", kvik_register_models=kvik_register_models), "bad", "kvik-bad")
    fresh_manager.register(fakes.models_plugin("good", "Fine"), "good")
    with caplog.at_level(logging.WARNING, logger="kvik.plugins.manager"):
        assert fresh_manager.models.names() == ["Fine"]
    (failure,) = fresh_manager.failures
    assert (failure.plugin, failure.distribution) == ("bad", "kvik-bad")
    assert "RuntimeError: boom in registration" in failure.reason and "Traceback" in failure.reason
    assert "kvik-bad" in caplog.text and "boom in registration" in caplog.text


@pytest.mark.parametrize("target", [Arch1, "no_colon_here", ""])
def test_register_needs_a_module_colon_class_string(fresh_manager: PluginManager, fakes, target) -> None:
    def kvik_register_models(register):
        register("X", target)

    fresh_manager.register(fakes.make_plugin("p", kvik_register_models=kvik_register_models), "p")
    assert fresh_manager.models.names() == []
    assert "'module:Class' string target" in fresh_manager.failures[0].reason


def test_registering_after_use_rebuilds_the_registries(fresh_manager: PluginManager, fakes) -> None:
    fresh_manager.register(fakes.models_plugin("a", "A"), "a")
    assert fresh_manager.models.names() == ["A"]
    fresh_manager.register(fakes.models_plugin("b", "B"), "b")
    assert fresh_manager.models.names() == ["A", "B"]


def test_every_registration_hook_fills_its_own_registry(fresh_manager: PluginManager, fakes) -> None:
    hooks = {
        "kvik_register_platforms": "platforms",
        "kvik_register_attention_backends": "attention_backends",
        "kvik_register_quantization_methods": "quantization_methods",
        "kvik_register_models": "models",
        "kvik_register_model_formats": "model_formats",
    }
    impls = {}
    for hook, attr in hooks.items():
        impls[hook] = lambda register, _attr=attr: register(f"{_attr}_thing", f"mod:{_attr}")
    fresh_manager.register(fakes.make_plugin("all", **impls), "all", "kvik-all")
    for attr in hooks.values():
        assert getattr(fresh_manager, attr).names() == [f"{attr}_thing"]


def test_same_plugin_name_twice_is_refused(fresh_manager: PluginManager, fakes) -> None:
    assert fresh_manager.register(fakes.models_plugin("dup", "A"), "dup", "kvik-one")
    assert not fresh_manager.register(fakes.models_plugin("dup", "B"), "dup", "kvik-two")
    assert "already registered (from kvik-one)" in fresh_manager.failures[0].reason
    assert fresh_manager.models.names() == ["A"]


def test_kvik_configure_notes_are_attributed_to_plugins(fresh_manager: PluginManager, fakes) -> None:
    from kvik.config import EngineConfig

    def kvik_configure(config):
        config.max_num_seqs = 7
        return ["max_num_seqs=7"]

    fresh_manager.register(fakes.make_plugin("tuner", kvik_configure=kvik_configure), "tuner")
    fresh_manager.register(fakes.make_plugin("quiet", kvik_configure=lambda config: None), "quiet")
    config = EngineConfig()
    assert fresh_manager.run_configure(config) == ["tuner: max_num_seqs=7"]
    assert config.max_num_seqs == 7
