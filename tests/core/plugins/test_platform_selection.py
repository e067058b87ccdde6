"""resolve_platform: auto-selection by priority, forced platforms, $KVIK_DEVICE, broken platforms."""

from __future__ import annotations

import logging

import pytest
from kvik.platforms.interface import MemoryInfo, Platform
from kvik.platforms.selector import resolve_platform
from kvik.plugins.registry import PluginError


class _Fake(Platform):
    device_type = "cpu"
    available = True

    @classmethod
    def is_available(cls) -> bool:
        return cls.available

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(total=1 << 30, free=1 << 29)

    def create_model_runner(self, config, model_config):  # pragma: no cover - never built here
        raise NotImplementedError


class Low(_Fake):
    name = "low"
    priority = 0


class High(_Fake):
    name = "high"
    priority = 10
    aliases = ("hi",)


class Absent(_Fake):
    name = "absent"
    priority = 100
    available = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return "no absent device found"


class Exploding(_Fake):
    name = "exploding"
    priority = 50

    @classmethod
    def is_available(cls) -> bool:
        raise OSError("driver crashed")


class NotAPlatform:
    name = "impostor"


@pytest.fixture
def manager(fresh_manager, fakes, fake_module):
    """Platforms low, high, absent from kvik-fake-platforms."""
    fake_module("fake_platforms", Low=Low, High=High, Absent=Absent, Exploding=Exploding, NotAPlatform=NotAPlatform)

    def add(*names: str, plugin: str = "fakes", dist: str = "kvik-fake-platforms") -> None:
        def kvik_register_platforms(register):
            for name in names:
                register(name.lower(), f"fake_platforms:{name}")

        fresh_manager.register(fakes.make_plugin(plugin, kvik_register_platforms=kvik_register_platforms), plugin, dist)

    add("Low", "High", "Absent")
    fresh_manager.add = add
    return fresh_manager


def test_auto_picks_highest_priority_available(manager) -> None:
    assert isinstance(resolve_platform(None, manager), High)
    assert isinstance(resolve_platform("auto", manager), High)


def test_forced_platform_wins_over_priority(manager) -> None:
    assert isinstance(resolve_platform("low", manager), Low)
    assert isinstance(resolve_platform("LOW", manager), Low)
    assert isinstance(resolve_platform("hi", manager), High)  # an alias


def test_forced_unknown_platform_lists_the_registered_ones(manager) -> None:
    with pytest.raises(PluginError, match=r"unknown platform 'tpu'; registered: absent, high, low"):
        resolve_platform("tpu", manager)


def test_forced_unavailable_platform_is_a_hard_error(manager) -> None:
    with pytest.raises(PluginError) as info:
        resolve_platform("absent", manager)
    assert "'absent'" in str(info.value) and "no absent device found" in str(info.value)
    assert "does not fall back" in str(info.value)


def test_kvik_device_env_var(manager, monkeypatch) -> None:
    monkeypatch.setenv("KVIK_DEVICE", "low")
    assert isinstance(resolve_platform(None, manager), Low)
    assert isinstance(resolve_platform("high", manager), High)  # an explicit device beats the env var
    monkeypatch.setenv("KVIK_DEVICE", "absent")
    with pytest.raises(PluginError, match=r"\$KVIK_DEVICE=absent"):
        resolve_platform(None, manager)


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("Exploding", "OSError: driver crashed"),
        ("NotAPlatform", "not a subclass of kvik.platforms.Platform"),
        ("Missing", "could not import fake_platforms:Missing"),
    ],
)
def test_broken_platform_is_skipped_with_a_warning_during_auto(manager, caplog, broken, expected) -> None:
    manager.add(broken, plugin="broken", dist="kvik-broken")
    with caplog.at_level(logging.WARNING, logger="kvik.platforms.selector"):
        assert isinstance(resolve_platform(None, manager), High)
    assert f"skipping platform '{broken.lower()}' from kvik-broken" in caplog.text
    assert expected in caplog.text


def test_forcing_a_broken_platform_is_a_hard_error(manager) -> None:
    manager.add("Exploding", plugin="broken", dist="kvik-broken")
    with pytest.raises(PluginError, match=r"'exploding'.*failed its availability check: OSError: driver crashed"):
        resolve_platform("exploding", manager)


def test_broken_platform_does_not_hide_an_alias(manager) -> None:
    manager.add("Missing", plugin="broken", dist="kvik-broken")
    assert isinstance(resolve_platform("hi", manager), High)


def test_conflicting_platform_name_names_both_distributions(manager, fakes) -> None:
    manager.add("Low", plugin="again", dist="kvik-other")  # the same target again is not a conflict
    assert isinstance(resolve_platform("low", manager), Low)
    clash = fakes.make_plugin("clash", kvik_register_platforms=lambda register: register("high", "fake_platforms:Low"))
    manager.register(clash, "clash", "kvik-clash")
    with pytest.raises(PluginError, match=r"kvik-fake-platforms \(fake_platforms:High\) and kvik-clash"):
        resolve_platform("high", manager)
    assert isinstance(resolve_platform(None, manager), Low)  # auto skips the ambiguous name


def test_no_available_platform_says_what_to_install(fresh_manager) -> None:
    with pytest.raises(PluginError, match=r"no available platform \(registered: none installed\).*kvik-cpu"):
        resolve_platform(None, fresh_manager)
