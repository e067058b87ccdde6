"""Model architectures, checkpoint formats and loading."""
