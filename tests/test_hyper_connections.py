"""mHC, the multi-stream hyper-connections baseline (docs/method.md §8, §12.9): doubly stochastic stream mixing,
PreNorm while its gates are closed, exact gradients."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx

from attnres_jax.residuals.hyper_connections import HyperParams, coefficients, permutation_matrices, sinkhorn
from attnres_jax.train.loss import next_token_loss
from helpers import make_model, max_rel_error, random_tokens
from reference import mhc_reference_logits


def assert_doubly_stochastic(matrices, tol):
  matrices = np.asarray(matrices, np.float64)
  assert matrices.min() >= 0
  np.testing.assert_allclose(matrices.sum(-1), 1.0, atol=tol)
  np.testing.assert_allclose(matrices.sum(-2), 1.0, atol=tol)


@pytest.mark.parametrize("streams,scale,iters", [(2, 0.5, 20), (4, 1.0, 20), (8, 1.0, 20), (8, 2.0, 50)])
def test_sinkhorn_is_doubly_stochastic_to_1e_5(streams, scale, iters):
  """Columns are exact (the last step), rows converge at Sinkhorn's rate: sharper logits need more iterations."""
  logits = scale * jax.random.normal(jax.random.key(streams), (64, streams, streams))
  assert_doubly_stochastic(sinkhorn(logits, iters), 1e-5)
  assert max_rel_error(sinkhorn(logits, iters), sinkhorn(logits + 3.0, iters)) < 1e-5  # only ratios matter


def test_permutation_mixing_is_exactly_doubly_stochastic():
  vertices = permutation_matrices(4)
  assert vertices.shape == (24, 4, 4) and len({v.tobytes() for v in vertices}) == 24
  assert_doubly_stochastic(vertices, 0)


@pytest.mark.parametrize("residual_mixing", ["sinkhorn", "permutations"])
def test_the_models_stream_mixing_matrices_are_doubly_stochastic(residual_mixing):
  model = make_model("mhc", mhc_residual_mixing=residual_mixing)
  hyper = model.hyper.params()
  hyper = HyperParams(hyper.projection, 30.0 * hyper.gates, hyper.bias)  # far from the uniform init
  streams_MxBxTxD = jax.random.normal(jax.random.key(0), (4, 2, 5, model.embedding.shape[1]))
  for layer in range(model.num_layers):
    for k in range(2):
      mix = coefficients(jax.tree.map(lambda p: p[layer, k], hyper), streams_MxBxTxD, model.stream_mixing, 1e-6)
      assert_doubly_stochastic(mix.res_BxTxMxM, 1e-5)
      assert float(jnp.std(mix.res_BxTxMxM, axis=(0, 1)).max()) > 1e-3  # input-dependent
      assert np.all((mix.pre_BxTxM > 0) & (mix.pre_BxTxM < 1)) and np.all((mix.post_BxTxM > 0) & (mix.post_BxTxM < 2))


@pytest.mark.parametrize("residual_mixing", ["sinkhorn", "permutations"])
def test_closed_gates_are_prenorm_and_open_gates_are_not(residual_mixing):
  tokens, prenorm = random_tokens(), make_model("prenorm")
  model = make_model("mhc", mhc_residual_mixing=residual_mixing)
  gates = model.hyper.stream_gates
  open_gates = gates[...]
  gates[...] = jnp.zeros_like(open_gates)
  assert max_rel_error(model(tokens), prenorm(tokens)) < 1e-6
  gates[...] = jnp.full_like(open_gates, 10.0)
  assert max_rel_error(model(tokens), prenorm(tokens)) > 1e-3


@pytest.mark.parametrize("residual_mixing", ["sinkhorn", pytest.param("permutations", marks=pytest.mark.slow)])
def test_open_gates_on_distinct_streams_match_the_literal_reference(residual_mixing):
  """Float64, gates x 30 and random biases: streams differ and the mixing is far from uniform and symmetric."""
  with jax.enable_x64(True):
    sizes = dict(dtype="float64", param_dtype="float64", init_std=0.5)  # sublayer outputs that matter
    model = make_model("mhc", mhc_residual_mixing=residual_mixing, mhc_streams=3, **sizes)
    hyper = model.hyper
    hyper.stream_gates[...] = 30.0 * hyper.stream_gates[...]
    hyper.stream_bias[...] = hyper.stream_bias[...] + jax.random.normal(jax.random.key(4), hyper.stream_bias.shape)
    tokens = random_tokens()
    # 1e-12 on jax 0.10, 6e-8 on jax 0.12's CPU path; a transposed H_res is off by 0.25.
    assert max_rel_error(model(tokens), mhc_reference_logits(model, tokens)) < 1e-6
    assert max_rel_error(model(tokens), make_model("prenorm", **sizes)(tokens)) > 1e-2


def test_mhc_gradients_float64():
  with jax.enable_x64(True):
    model = make_model("mhc", num_layers=2, d_model=16, num_heads=2, num_kv_heads=1, d_ff=16, mhc_streams=3,
                       mhc_sinkhorn_iters=5, dtype="float64", param_dtype="float64")
    model.hyper.stream_gates[...] = 3.0 * model.hyper.stream_gates[...]
    graphdef, params = nnx.split(model)
    tokens = random_tokens(length=5)
    loss = lambda p: next_token_loss(nnx.merge(graphdef, p), tokens)
    jax.test_util.check_grads(loss, (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
