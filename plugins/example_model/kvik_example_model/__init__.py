"""kvik-example-model: a worked example of a third-party kvik model plugin."""

ARCHITECTURE = "ParallelLlamaForCausalLM"
__version__ = "0.1.0"
