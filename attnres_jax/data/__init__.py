"""Token data: the byte-level stdlib corpus, token-files directories, and grain pipelines."""

from attnres_jax.data.pipeline import eval_batches, train_iterator
from attnres_jax.data.sources import load_splits
from attnres_jax.data.token_files import TokenSplits

__all__ = ["TokenSplits", "eval_batches", "load_splits", "train_iterator"]
