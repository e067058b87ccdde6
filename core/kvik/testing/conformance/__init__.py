"""The conformance suite: checks every plugin of a kind must pass.

``kvik.testing.conformance.platform.check_platform``,
``kvik.testing.conformance.quantization.check_quantization_method`` and
``kvik.testing.conformance.attention.check_attention_backend`` are also
re-exported by ``kvik.testing.pytest_plugin``.
"""
