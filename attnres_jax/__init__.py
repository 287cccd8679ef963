"""attnres_jax: Attention Residuals (Kimi Team, arXiv 2603.15031) in JAX / Flax NNX.

Exports resolve on first use, so that a module which needs no jax (the
tokenizer workers of `prepare_data`) imports without it.
"""

import importlib

_EXPORTS = {"Transformer": "attnres_jax.model.transformer", "depth_attention": "attnres_jax.residuals"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'attnres_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
