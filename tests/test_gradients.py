"""The custom-VJP depth loop has exactly the gradients of the spec (spec sections 2-5)."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax.train.loss import next_token_loss
from helpers import make_model, random_tokens
from reference import reference_logits


def reference_loss(model, tokens_BxT1):
  logits = reference_logits(model, tokens_BxT1[:, :-1])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxT1[:, 1:]))


@pytest.mark.parametrize("remat", ["full", "none", "save_dots"])
@pytest.mark.parametrize("residual,block_size", [("full", 1), ("block", 2), ("block", 3), ("block", 6)])
def test_gradients_match_autodiff_of_literal_spec(residual, block_size, remat):
  model = make_model(residual, block_size=block_size, remat=remat)
  tokens = random_tokens(length=9)
  loss, grads = nnx.jit(nnx.value_and_grad(next_token_loss))(model, tokens)
  want_loss, want_grads = nnx.value_and_grad(reference_loss)(model, tokens)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  flat_want = dict(nnx.to_flat_state(want_grads))
  # float32 noise floor: relative to each leaf, with an absolute floor at 1e-5 of the largest gradient.
  floor = 1e-5 * max(float(jnp.max(jnp.abs(g[...]))) for g in flat_want.values())
  for path, got in nnx.to_flat_state(grads):
    want = flat_want[path][...]
    np.testing.assert_allclose(got[...], want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))) + floor,
                               err_msg=str(path))


@pytest.mark.parametrize("residual,block_size", [("full", 1), ("block", 2), ("block", 3)])
def test_check_grads_float64(residual, block_size):
  with jax.enable_x64(True):
    model = make_model(residual, block_size=block_size, query_scale=0.3, num_layers=2, d_model=16, num_heads=2,
                       num_kv_heads=1, d_ff=16, dtype="float64", param_dtype="float64")
    tokens = random_tokens(length=5)
    graphdef, params = nnx.split(model)
    loss = lambda p: next_token_loss(nnx.merge(graphdef, p), tokens)
    jax.test_util.check_grads(loss, (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_one_optimizer_step_moves_every_pseudo_query_with_a_gradient():
  """Sublayer 0 sees only the embedding, so its query has no gradient; all others move.

  At zero queries the key-norm gains get no gradient either (logits are (w * g) . k).
  """
  model = make_model("block", block_size=2, random_queries=False)
  before = jax.tree.map(jnp.copy, nnx.state(model.depth))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  grads = nnx.grad(next_token_loss)(model, random_tokens(length=9))
  optimizer.update(model, grads)
  moved = lambda name: np.asarray(jnp.any(getattr(model.depth, name)[...] != before[name][...], axis=-1))
  first_only = np.zeros((model.num_layers, 2), bool)
  first_only[0, 0] = True
  np.testing.assert_array_equal(moved("pseudo_query"), ~first_only)
  assert moved("output_query")
  assert not moved("key_gain").any() and not moved("output_key_gain")
