"""The depth loop is a scan: the traced program does not grow with depth, and unrolling it changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax.residuals.depth_loop import LoopSpec, attnres_loop
from attnres_jax.residuals.depth_mixing import DepthParams, Mixing, output_mix
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.residuals.types import LayerGroup, SublayerOutput
from attnres_jax.train.loss import next_token_loss
from helpers import make_model, random_tokens
from reference import depth_attention


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
  return lambda weights_KxDxD, consts, h_BxTxD: SublayerOutput(jnp.tanh(h_BxTxD @ weights_KxDxD[k]))


@pytest.mark.parametrize("block_size,two_phase", [(1, False), (3, False), (3, True)])
def test_unrolled_or_segmented_loop_equals_one_scan(block_size, two_phase):
  """`unroll=True` (for the TPU compiler's cost analysis) and `segments=3` (three scans, each reading only the
  slots it can see, docs/method.md §7) change no output or gradient. Full AttnRes; Block with blocks starting
  inside a layer, direct and two-phase."""
  num_layers, width = 5, 16
  keys = jax.random.split(jax.random.key(0), 4)
  weights_LxKxDxD = jax.random.normal(keys[0], (num_layers, 2, width, width)) / np.sqrt(width)
  depth_LxK = DepthParams(jax.random.normal(keys[1], (num_layers, 2, width)),
                          1.0 + 0.1 * jax.random.normal(keys[2], (num_layers, 2, width)))
  embedding_BxTxD = jax.random.normal(keys[3], (2, 8, width))
  schedule = BlockSchedule(num_layers, 2, block_size)

  def loss(unroll, segments, weights_LxKxDxD, depth_LxK, embedding_BxTxD):
    spec = LoopSpec(schedule, remat="full", two_phase=two_phase, unroll=unroll, segments=segments)
    state = attnres_loop((LayerGroup((_tanh_sublayer(0), _tanh_sublayer(1)), weights_LxKxDxD),), spec,
                         depth_LxK=depth_LxK, embedding_BxTxD=embedding_BxTxD, consts=()).state
    h_BxTxD, _ = output_mix(Mixing(), state, jnp.ones(width), jnp.ones(width))
    return jnp.sum(jnp.sin(h_BxTxD)), state

  args = (weights_LxKxDxD, depth_LxK, embedding_BxTxD)
  variants = [(False, 1), (True, 1), (False, 3)]
  steps = [jax.jit(jax.value_and_grad(lambda *a, u=u, s=s: loss(u, s, *a), argnums=(0, 1, 2), has_aux=True))
           for u, s in variants]
  whiles = [step.lower(*args).as_text().count("stablehlo.while") for step in steps]
  assert whiles == [2, 0, 6], whiles  # forward and backward scans
  scanned, *others = (step(*args) for step in steps)
  for other in others:
    for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(scanned)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_segments_read_only_the_slots_their_sublayers_see():
  """Full AttnRes over 16 sublayers in 4 runs of 2 layers: each reads the slots its last sublayer sees; the
  last run (and a single one) the whole buffer."""
  assert BlockSchedule(8, 2, 1).segments(4, two_phase=False) == ((0, 2, 3), (2, 4, 7), (4, 6, 11), (6, 8, 16))
  assert BlockSchedule(8, 2, 1).segments(1, two_phase=False) == ((0, 8, 16),)
  assert BlockSchedule(16, 2, 4).segments(4, two_phase=True) == ((0, 4, 2), (4, 8, 4), (8, 12, 6), (12, 16, 8))
  assert BlockSchedule(2, 2, 1).segments(4, two_phase=False) == ((0, 1, 1), (1, 2, 4))


def _aux_sublayer(k, fn):
  """`fn(h W_k)` with an auxiliary loss `mean(out^2)` (differentiable) and its RMS as a side output."""
  def sublayer(weights_KxDxD, consts, h_BxTxD):
    out_BxTxD = fn(h_BxTxD @ weights_KxDxD[k])
    return SublayerOutput(out_BxTxD, aux_loss=0.3 * jnp.mean(out_BxTxD**2), side=jnp.sqrt(jnp.mean(out_BxTxD**2)))
  return sublayer


@pytest.mark.parametrize("remat,two_phase,segments", [
    ("full", False, 1), ("full", False, 4), *(pytest.param(remat, two_phase, 1, marks=pytest.mark.slow)
                                              for remat, two_phase in (("none", False), ("full", True)))])
def test_auxiliary_losses_get_gradients_through_the_custom_vjp_over_layer_groups(remat, two_phase, segments):
  """Two groups of layers with different sublayers (2 `tanh` layers, then 3 `sin` ones), Block S = 3: the
  loop's output and the sum of the sublayers' auxiliary losses have the gradients of a literal Python loop
  (`reference.depth_attention`); side outputs come back per group, stacked over its layers. With 4 segments
  the scans are also cut inside each group."""
  width, block_size, sizes = 8, 3, (2, 3)
  keys = jax.random.split(jax.random.key(1), 6)
  group_weights = tuple(jax.random.normal(key, (size, 2, width, width)) / np.sqrt(width)
                        for key, size in zip(keys[:2], sizes))
  depth_LxK = DepthParams(jax.random.normal(keys[2], (5, 2, width)),
                          1.0 + 0.1 * jax.random.normal(keys[3], (5, 2, width)))
  embedding_BxTxD = jax.random.normal(keys[4], (2, 4, width))
  functions = (jnp.tanh, jnp.sin)
  spec = LoopSpec(BlockSchedule(5, 2, block_size), remat=remat, two_phase=two_phase, segments=segments)
  assert len(spec.runs(sizes)) == (2 if segments == 1 else 4)

  def loop_loss(group_weights, depth_LxK, embedding_BxTxD):
    groups = tuple(LayerGroup((_aux_sublayer(0, fn), _aux_sublayer(1, fn)), weights)
                   for fn, weights in zip(functions, group_weights))
    output = attnres_loop(groups, spec, depth_LxK=depth_LxK, embedding_BxTxD=embedding_BxTxD, consts=())
    h_BxTxD, _ = output_mix(Mixing(), output.state, jnp.ones(width), jnp.ones(width))
    return jnp.sum(jnp.sin(h_BxTxD)) + output.aux_loss, output.sides

  def literal_loss(group_weights, depth_LxK, embedding_BxTxD):
    layers = [(fn, w) for fn, weights in zip(functions, group_weights) for w in weights]
    blocks, partial, aux = [], embedding_BxTxD, 0.0
    for l in range(10):
      h = depth_attention(jnp.stack(blocks + [partial]), depth_LxK.query[l // 2, l % 2],
                          depth_LxK.gain[l // 2, l % 2], 1e-6)
      if l % block_size == 0:
        blocks, partial = blocks + [partial], jnp.zeros_like(partial)
      fn, weights = layers[l // 2]
      out = fn(h @ weights[l % 2])
      aux, partial = aux + 0.3 * jnp.mean(out**2), partial + out
    h = depth_attention(jnp.stack(blocks + [partial]), jnp.ones(width), jnp.ones(width), 1e-6)
    return jnp.sum(jnp.sin(h)) + aux

  args = (group_weights, depth_LxK, embedding_BxTxD)
  (loss, sides), grads = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1, 2), has_aux=True))(*args)
  want_loss, want_grads = jax.value_and_grad(literal_loss, argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert [tuple(side.shape for side in group) for group in sides] == [((2,), (2,)), ((3,), (3,))]
