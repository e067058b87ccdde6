"""Test utilities and the conformance suite shipped with kvik for plugin authors."""
