"""Conformance checks plugin authors run against their implementations.

Each ``check_*`` function raises ``AssertionError`` describing every mismatch.
"""
