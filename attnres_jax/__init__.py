"""attnres_jax: Attention Residuals (Kimi Team, arXiv 2603.15031) in JAX / Flax NNX."""

from attnres_jax.model import Transformer
from attnres_jax.residuals import depth_attention

__all__ = ["Transformer", "depth_attention"]
