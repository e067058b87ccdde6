"""kvik's NVIDIA GPU platform ("cuda"); :mod:`kvik_rocm` reuses it for AMD GPUs."""
