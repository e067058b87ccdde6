"""Pure-Python scheduling: block pool, KV-cache manager, scheduler."""
