"""Hardware platforms: the interface and the selection logic."""

from kvik.platforms.interface import MemoryInfo, Platform
from kvik.platforms.selector import resolve_platform

__all__ = ["MemoryInfo", "Platform", "resolve_platform"]
