"""Ablation variants of the depth-mixing rule (docs/method.md §8): each one's defining property, and every
config under `configs/ablations/` trains one step (mHC: `test_hyper_connections.py`)."""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax import depth_attention
from attnres_jax.residuals.depth_mixing import DepthParams, Mixing, sublayer_query
from attnres_jax.residuals.mixing_rules import ContentLogits, LearnedLogits, mix_sources, source_weights
from attnres_jax.train.loss import next_token_loss
from helpers import (REPO, VOCAB, assert_loss_and_gradients_match, make_model, max_rel_error,
                     move_ablation_params_off_init, random_tokens)
from reference import full_reference_logits

ABLATIONS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs", "ablations"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def random_sources(seed=0, num_sources=5, width=16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  scales = jnp.exp(jax.random.normal(k3, (num_sources, 1, 1, 1)))
  return (scales * jax.random.normal(k1, (num_sources, 2, 3, width)), jax.random.normal(k2, (width,)))


def test_one_head_equals_the_spec_rule():
  sources, query = random_sources()
  visible = jnp.array([True, True, False, True, True])
  got = mix_sources(ContentLogits(num_heads=1), sources, visible, query, 1e-6)
  want = depth_attention(sources, query, None, eps=1e-6, mask=jnp.broadcast_to(visible[:, None, None], (5, 2, 3)))
  assert max_rel_error(got, want) < 1e-5


def test_heads_softmax_separately_over_their_channel_groups():
  sources, query = random_sources()
  visible = jnp.ones(5, bool)
  weights = source_weights(ContentLogits(num_heads=4), sources, visible, query, 1e-6)
  np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-6)
  group = mix_sources(ContentLogits(num_heads=4), sources, visible, query, 1e-6)[..., 4:8]
  alone = depth_attention(sources[..., 4:8], query[4:8], None, eps=1e-6)  # its own group only
  assert max_rel_error(group, alone) > 1e-3  # the key norm still spans all of d
  keyed = sources * jax.lax.rsqrt(jnp.mean(sources**2, -1, keepdims=True) + 1e-6)
  logits = jnp.einsum("sbtc,c->sbt", keyed[..., 4:8], query[4:8])
  np.testing.assert_allclose(weights[..., 1], jax.nn.softmax(logits, axis=0), rtol=1e-5)


def test_key_norm_makes_weights_scale_invariant_and_its_ablation_does_not():
  sources, query = random_sources()
  visible, scaled = jnp.ones(5, bool), sources.at[2].multiply(10.0)
  weights = lambda rule, s: source_weights(rule, s, visible, query, 1e-6)
  np.testing.assert_allclose(weights(ContentLogits(), scaled), weights(ContentLogits(), sources), rtol=1e-5, atol=1e-7)
  off = ContentLogits(key_norm=False)
  assert max_rel_error(weights(off, scaled), weights(off, sources)) > 0.1


def test_sigmoid_weights_are_not_normalised():
  _, stats = make_model("full", depth_normalization="sigmoid")(random_tokens(), return_stats=True)
  sums = np.asarray(stats["depth_weights"]).sum(axis=-1)
  assert np.all(np.abs(sums[1:] - 1.0) > 1e-3)  # sublayer 0 sees one source, sigmoid < 1 too
  assert np.all((np.asarray(stats["depth_weights"]) >= 0) & (np.asarray(stats["depth_weights"]) < 1))


def test_window_covering_the_depth_is_full_and_a_window_of_one_keeps_embedding_and_newest():
  tokens = random_tokens()
  full = make_model("full")
  assert max_rel_error(make_model("full", depth_window=6)(tokens), full(tokens)) < 1e-5
  _, stats = make_model("full", depth_window=1)(tokens, return_stats=True)
  weights = np.asarray(stats["depth_weights"])  # [L, N + 1]; after sublayer l's seal the newest is slot l
  for l, row in enumerate(weights):
    np.testing.assert_array_equal(np.nonzero(row)[0], sorted({0, l}), err_msg=str(l))


FULL_VARIANTS = {
    "input_dependent_query": dict(depth_query_projection=True),
    "input_independent_mixing": dict(depth_logits="learned"),
    "denseformer": dict(depth_logits="learned", depth_normalization="none"),
}


def full_variant(name, **overrides):
  """A tiny Full AttnRes model of the variant, with random queries / logits / weights and query projection."""
  model = make_model("full", query_scale=0.3, **FULL_VARIANTS[name], **overrides)
  return move_ablation_params_off_init(model, projection_scale=0.1)


@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_full_variant_matches_the_literal_spec_in_value_and_gradient(name):
  """In float64, so that every parameter's gradient is checked to 1e-8 of its own size, however small."""
  with jax.enable_x64(True):
    model = full_variant(name, dtype="float64", param_dtype="float64")
    assert_loss_and_gradients_match(model, random_tokens(length=9), full_reference_logits, leaf_tolerance=1e-8,
                                    global_floor=0.0)


@pytest.mark.parametrize("name", ["input_independent_mixing", "denseformer"])
def test_logged_weights_of_learned_logits_are_the_parameters_the_forward_uses(name):
  """Full AttnRes: sublayer l mixes v_0 .. v_l with row l's entries 0 .. l (as in the literal reference)."""
  model = full_variant(name)
  _, stats = model(random_tokens(), return_stats=True)
  rows = np.asarray(model.depth.pseudo_query[...]).reshape(model.num_sublayers, -1)
  for l, logged in enumerate(np.asarray(stats["depth_weights"])):
    want = rows[l, :l + 1] if name == "denseformer" else jax.nn.softmax(rows[l, :l + 1])
    np.testing.assert_allclose(logged[:l + 1], want, rtol=1e-5, err_msg=str(l))
    assert np.all(logged[l + 1:] == 0)


@pytest.mark.parametrize("residual", ["full", "block"])
def test_denseformer_at_init_is_prenorm(residual):
  tokens = random_tokens()
  dense = make_model(residual, random_queries=False, **FULL_VARIANTS["denseformer"])
  assert max_rel_error(dense(tokens), make_model("prenorm")(tokens)) < 1e-6
  assert np.all(dense.depth.pseudo_query[...] == 1.0) and dense.depth.key_gain is None


@pytest.mark.parametrize("name", ["input_dependent_query", "input_independent_mixing"])
def test_variant_at_zero_init_is_full_attnres_at_zero_init(name):
  tokens = random_tokens()
  variant = make_model("full", random_queries=False, **FULL_VARIANTS[name])
  assert max_rel_error(variant(tokens), make_model("full", random_queries=False)(tokens)) < 1e-6


def test_learned_logits_weights_are_the_same_for_every_token_and_content_weights_are_not():
  sources, query = random_sources()
  visible = jnp.array([True, False, True, True, True])
  logits = jnp.array([0.5, 9.0, -1.0, 2.0, 0.0])
  weights = source_weights(LearnedLogits(), sources, visible, logits, 1e-6)[..., 0]
  want = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf))
  np.testing.assert_allclose(weights, jnp.broadcast_to(want[:, None, None], weights.shape), rtol=1e-6)
  raw = source_weights(LearnedLogits(normalization="none"), sources, visible, logits, 1e-6)
  np.testing.assert_array_equal(raw[:, 0, 0, 0], jnp.where(visible, logits, 0.0))
  content = source_weights(ContentLogits(), sources, visible, query, 1e-6)[..., 0]
  assert float(jnp.std(content, axis=(1, 2)).max()) > 1e-2


def test_input_dependent_query_is_per_token_from_the_newest_source():
  sources, query = random_sources()
  projection = 0.3 * jax.random.normal(jax.random.key(3), (query.shape[0],) * 2)
  per_token = sublayer_query(Mixing(ContentLogits(query_projection=True)),
                             DepthParams(query, jnp.ones_like(query), projection), sources[-1])
  np.testing.assert_allclose(per_token, query + sources[-1] @ projection, rtol=1e-5, atol=1e-5)
  visible = jnp.ones(5, bool)
  weights = source_weights(ContentLogits(query_projection=True), sources, visible, per_token, 1e-6)
  for b, t in [(0, 0), (1, 2)]:  # each token's softmax of its own query
    alone = source_weights(ContentLogits(), sources[:, b:b + 1, t:t + 1], visible, per_token[b, t], 1e-6)
    np.testing.assert_allclose(weights[:, b, t], alone[:, 0, 0], rtol=1e-5)
  assert float(jnp.std(weights, axis=(1, 2)).max()) > 1e-2


def test_normalized_input_dependent_query_ignores_the_newest_sources_scale():
  """`w + W RMSNorm(h)` (docs/method.md §12.4) is the same query for `h` and `100 h`; the paper's `w + W h` is not."""
  sources, query = random_sources()
  projection = 0.3 * jax.random.normal(jax.random.key(3), (query.shape[0],) * 2)
  depth = DepthParams(query, jnp.ones_like(query), projection)
  query_of = lambda rule, newest: sublayer_query(Mixing(rule, eps=1e-6), depth, newest)
  normalized = ContentLogits(query_projection=True, query_norm=True)
  np.testing.assert_allclose(query_of(normalized, 100 * sources[-1]), query_of(normalized, sources[-1]), rtol=1e-5,
                             atol=1e-5)
  rms = jnp.sqrt(jnp.mean(sources[-1] ** 2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(query_of(normalized, sources[-1]), query + (sources[-1] / rms) @ projection, rtol=1e-5,
                             atol=1e-5)
  raw = ContentLogits(query_projection=True)
  assert max_rel_error(query_of(raw, 100 * sources[-1]), query_of(raw, sources[-1])) > 1.0


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_ablation_config_trains_one_step(name):
  config = importlib.import_module(f"configs.ablations.{name}").get_config().model
  config.update(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, d_ff=32,
                block_size=min(config.block_size, 4), depth_window=min(config.depth_window, 2))
  model = make_model(config.residual, **{k: v for k, v in config.items() if k != "residual"})
  loss, grads = nnx.value_and_grad(next_token_loss)(model, random_tokens(length=9))
  assert np.isfinite(loss)
  for path, grad in nnx.to_flat_state(grads):
    assert np.all(np.isfinite(grad[...])) and np.any(grad[...] != 0), path
