"""The scanned transformer and its building blocks."""

from attnres_jax.model.transformer import Transformer
