"""kvik-cpu: run kvik on the host CPU with PyTorch."""

__version__ = "0.1.0"
