"""Token data: documents, tokenizers, token-files directories, the stdlib corpus and grain pipelines.

Exports resolve on first use (see `attnres_jax/__init__.py`).
"""

import importlib

_EXPORTS = {"TokenSplits": "attnres_jax.data.token_files", "eval_batches": "attnres_jax.data.pipeline",
            "train_iterator": "attnres_jax.data.pipeline", "load_splits": "attnres_jax.data.sources"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'attnres_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
