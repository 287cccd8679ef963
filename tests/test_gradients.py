"""The custom-VJP depth loop has exactly the gradients of docs/method.md §2-§5."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax.train.loss import next_token_loss
from helpers import assert_loss_and_gradients_match, make_model, random_tokens
from reference import reference_logits


# Every remat policy at S = 1 and 2; blocks crossing layers (S = 3, 6) at the other policies only with -m slow.
def gradient_case(residual, block_size, remat):
  slow = block_size == 6 or (block_size == 3 and remat != "full")
  return pytest.param(residual, block_size, remat, marks=[pytest.mark.slow] if slow else [])


GRADIENT_CASES = [gradient_case(residual, block_size, remat)
                  for residual, block_size in (("full", 1), ("block", 2), ("block", 3), ("block", 6))
                  for remat in ("full", "none", "save_dots")]


@pytest.mark.parametrize("residual,block_size,remat", GRADIENT_CASES)
def test_gradients_match_autodiff_of_literal_spec(residual, block_size, remat):
  model = make_model(residual, block_size=block_size, remat=remat)
  assert_loss_and_gradients_match(model, random_tokens(length=9), reference_logits)


@pytest.mark.parametrize("residual,block_size", [
    pytest.param("full", 1, marks=pytest.mark.slow), ("block", 2), ("block", 3)])
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
