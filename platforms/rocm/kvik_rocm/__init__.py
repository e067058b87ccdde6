"""kvik's AMD GPU platform ("rocm"), built on kvik-cuda's shared GPU platform and runner."""
