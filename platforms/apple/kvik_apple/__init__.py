"""kvik on Apple Silicon: an MLX model runner over kvik's paged KV cache.

Nothing here imports MLX at import time; the platform probe looks for the
package and only the runner modules import ``mlx.core``.
"""

from __future__ import annotations

__version__ = "0.1.0"
