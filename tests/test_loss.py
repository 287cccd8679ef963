"""The chunked cross-entropy (docs/method.md §13) equals the plain one and never holds the whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax.train.loss import next_token_loss
from helpers import make_model, random_tokens


def loss_and_grads(model, tokens_BxT1, chunk_size):
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda p: next_token_loss(nnx.merge(graphdef, p), tokens_BxT1, chunk_size)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("residual,tie", [("prenorm", False), ("block", True)])
@pytest.mark.parametrize("chunk_size", [2, 4])
def test_chunked_loss_and_gradients_equal_the_plain_ones(residual, tie, chunk_size):
  model = make_model(residual, tie_embeddings=tie)
  tokens_BxT1 = random_tokens(batch=3, length=9)
  want_loss, want_grads = loss_and_grads(model, tokens_BxT1, 0)
  loss, grads = loss_and_grads(model, tokens_BxT1, chunk_size)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  flat_want = dict(nnx.to_flat_state(want_grads))
  for path, got in nnx.to_flat_state(grads):
    want = flat_want[path][...]
    np.testing.assert_allclose(got[...], want, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(want))),
                               err_msg=str(path))


def test_a_chunk_size_that_does_not_divide_the_length_is_refused():
  with pytest.raises(ValueError, match="must divide the sequence length 8"):
    next_token_loss(make_model("prenorm"), random_tokens(length=9), 3)


def test_chunked_loss_never_holds_the_whole_logits():
  """Compiled temp memory of loss + gradients: the plain loss holds the float32 logits `[B, T, V]` and
  their gradient; chunks of 16 positions hold a sixteenth of them at a time, so at least one whole
  logits array is saved (the rest of the temp is the model's, dense attention scores among it)."""
  vocab, batch, length = 8192, 2, 256
  model = make_model("prenorm", vocab_size=vocab, random_queries=False)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens_BxT1 = jnp.zeros((batch, length + 1), jnp.int32)
  logits_bytes = batch * length * vocab * 4

  def temp_bytes(chunk_size):
    loss = lambda p: next_token_loss(nnx.merge(graphdef, p), tokens_BxT1, chunk_size)
    return jax.jit(jax.value_and_grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(0)
  assert plain >= logits_bytes
  assert plain - temp_bytes(16) >= logits_bytes
