"""Next-token cross-entropy of a language model."""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def next_token_loss(model, tokens_BxT1: Array) -> Array:
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
  logits_BxTxV = model(tokens_BxT1[:, :-1])
  losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxT1[:, 1:])
  return jnp.mean(losses_BxT)
