"""Speculative decoding: proposers guess the next tokens on the host, the target model verifies them.

A request with ``k`` draft tokens is scheduled as a ``k + 1``-token row; the runner
scores all ``k + 1`` positions in one forward and :mod:`kvik.spec_decode.verify`
accepts a prefix of the drafts with an exact rejection rule. See docs/spec_decode.md.
"""
