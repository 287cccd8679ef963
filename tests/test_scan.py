"""The depth loop is a scan: the traced program does not grow with depth, and unrolling it changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax.residuals.depth_loop import DepthParams, attnres_loop, output_mix
from attnres_jax.residuals.mixing_rules import MixingRule
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.train.loss import next_token_loss
from helpers import make_model, random_tokens


def count_equations(jaxpr) -> int:
  """Equations of a jaxpr and of every jaxpr nested in its equations' parameters."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += count_equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += count_equations(sub)
  return total


def traced_size(residual, num_layers, overrides):
  model = make_model(residual, num_layers=num_layers, block_size=4, **overrides)
  graphdef, params = nnx.split(model)
  loss = lambda p, tokens: next_token_loss(nnx.merge(graphdef, p), tokens)
  tokens = random_tokens()
  forward = jax.make_jaxpr(loss)(params, tokens).jaxpr
  backward = jax.make_jaxpr(jax.grad(loss))(params, tokens).jaxpr
  return count_equations(forward), count_equations(backward)


@pytest.mark.parametrize("residual,overrides", [
    ("prenorm", {}), ("full", {}), ("block", {}), ("block", dict(two_phase=True)),
    pytest.param("full", dict(depth_query_projection=True), marks=pytest.mark.slow),
    pytest.param("full", dict(depth_logits="learned", depth_normalization="none"), marks=pytest.mark.slow),
    ("mhc", {}), pytest.param("mhc", dict(mhc_residual_mixing="permutations"), marks=pytest.mark.slow)])
def test_traced_program_is_flat_in_depth(residual, overrides):
  shallow, deep = traced_size(residual, 4, overrides), traced_size(residual, 16, overrides)
  assert shallow == deep, (shallow, deep)
  assert shallow[1] > shallow[0] > 50  # really counted something, nested jaxprs included


def _tanh_sublayer(k):
  """Sublayer `k` of a layer: `tanh(h W_k)` with the layer's weights `[K, d, d]`, no auxiliary output."""
  return lambda weights_KxDxD, consts, h_BxTxD: (jnp.tanh(h_BxTxD @ weights_KxDxD[k]), None)


@pytest.mark.parametrize("block_size", [1, 3])  # Full AttnRes; Block with blocks starting inside a layer
def test_unrolled_loop_equals_scanned_loop(block_size):
  """`unroll=True` (for the TPU compiler's cost analysis, docs/method.md §7) changes no output or gradient."""
  num_layers, width = 4, 16
  keys = jax.random.split(jax.random.key(0), 4)
  weights_LxKxDxD = jax.random.normal(keys[0], (num_layers, 2, width, width)) / np.sqrt(width)
  depth_LxK = DepthParams(jax.random.normal(keys[1], (num_layers, 2, width)),
                          1.0 + 0.1 * jax.random.normal(keys[2], (num_layers, 2, width)))
  embedding_BxTxD = jax.random.normal(keys[3], (2, 8, width))
  schedule = BlockSchedule(num_layers, 2, block_size)

  def loss(unroll, weights_LxKxDxD, depth_LxK, embedding_BxTxD):
    state, _, _ = attnres_loop((_tanh_sublayer(0), _tanh_sublayer(1)), schedule, "full", 1e-6, "xla", MixingRule(),
                               False, False, weights_LxKxDxD, depth_LxK, embedding_BxTxD, (), unroll=unroll)
    h_BxTxD, _ = output_mix(state, jnp.ones(width), jnp.ones(width), 1e-6, "xla")
    return jnp.sum(jnp.sin(h_BxTxD)), state

  args = (weights_LxKxDxD, depth_LxK, embedding_BxTxD)
  steps = [jax.jit(jax.value_and_grad(lambda *a, u=u: loss(u, *a), argnums=(0, 1, 2), has_aux=True))
           for u in (False, True)]
  assert [step.lower(*args).as_text().count("stablehlo.while") for step in steps] == [2, 0]  # forward, backward
  scanned, unrolled = (step(*args) for step in steps)
  for got, want in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
