"""The contract of every registered depth-mixing rule (`residuals/mixing_rules.py`): hidden sources get exactly
zero weight and zero gradient, so the backward replay against the final buffer is exact (docs/method.md §7);
and each rule, in Block and Full AttnRes, matches the literal reference in value and float64 gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnres_jax.residuals.mixing_rules import RULES, ContentLogits, LearnedLogits, mix_sources, source_weights
from configs.ablations import sliding_window
from helpers import assert_loss_and_gradients_match, make_model, move_ablation_params_off_init, random_tokens
from reference import rule_reference_logits

# Every registered rule with each of its options, as the model's config fields select it.
CASES = {
    "paper": ({}, ContentLogits()),
    "sigmoid": (dict(depth_normalization="sigmoid"), ContentLogits(normalization="sigmoid")),
    "multihead": (dict(depth_heads=4), ContentLogits(num_heads=4)),
    "no_key_norm": (dict(depth_key_norm=False), ContentLogits(key_norm=False)),
    "input_dependent_query": (dict(depth_query_projection=True), ContentLogits(query_projection=True)),
    "input_dependent_query_normalized": (dict(depth_query_projection=True, depth_query_norm=True),
                                         ContentLogits(query_projection=True, query_norm=True)),
    "learned_logits": (dict(depth_logits="learned"), LearnedLogits()),
    "learned_sigmoid": (dict(depth_logits="learned", depth_normalization="sigmoid"),
                        LearnedLogits(normalization="sigmoid")),
    "denseformer": (dict(depth_logits="learned", depth_normalization="none"), LearnedLogits(normalization="none")),
    "window": (dict(depth_window=2), ContentLogits(window=2)),
}


def test_every_registered_rule_is_checked():
  assert {type(rule) for _, rule in CASES.values()} == set(RULES.values())


def _query(rule, width, num_sources, key):
  shape = (num_sources,) if isinstance(rule, LearnedLogits) else (2, 3, width)  # per token, like a projection
  return jax.random.normal(key, shape)


@pytest.mark.parametrize("name", CASES)
def test_hidden_sources_get_zero_weight_and_zero_gradient(name):
  rule = CASES[name][1]
  keys = jax.random.split(jax.random.key(0), 4)
  sources = jax.random.normal(keys[0], (6, 2, 3, 8))
  visible = jnp.array([True, False, True, True, False, True])
  query = _query(rule, 8, 6, keys[1])
  weights = source_weights(rule, sources, visible, query, 1e-6)
  assert np.all(np.asarray(weights)[~np.asarray(visible)] == 0.0)
  cotangent = jax.random.normal(keys[2], sources.shape[1:])
  grads = jax.grad(lambda s: jnp.sum(mix_sources(rule, s, visible, query, 1e-6) * cotangent))(sources)
  assert np.all(np.asarray(grads)[~np.asarray(visible)] == 0.0)
  assert np.all(np.isfinite(grads)) and float(jnp.max(jnp.abs(grads))) > 0
  later = sources.at[~visible].set(1e3 * jax.random.normal(keys[3], sources[~visible].shape))  # "future" values
  np.testing.assert_array_equal(mix_sources(rule, later, visible, query, 1e-6),
                                mix_sources(rule, sources, visible, query, 1e-6))


def _model(residual, name):
  """A tiny model of the rule with every parameter away from its init: queries / logits, gains, projections."""
  overrides = CASES[name][0]
  model = make_model(residual, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, d_ff=24, block_size=3,
                     query_scale=0.5, dtype="float64", param_dtype="float64", **overrides)
  assert model.mixing.rule == CASES[name][1]
  return move_ablation_params_off_init(model, projection_scale=0.2)


@pytest.mark.parametrize("residual,name", [
    *(("block", name) for name in CASES if name not in ("paper", "window")), ("full", "window"),
    # the paper's rule is checked in test_gradients.py, Full's learned logits, DenseFormer and input-dependent
    # query in test_ablations.py; the others once, with -m slow
    *(pytest.param(residual, name, marks=pytest.mark.slow) for residual, name in (
        ("block", "paper"), ("full", "paper"), ("full", "learned_logits"), ("full", "denseformer"),
        ("full", "input_dependent_query"), ("full", "sigmoid"), ("full", "multihead"), ("full", "no_key_norm"),
        ("full", "learned_sigmoid")))])
def test_rule_matches_the_literal_reference_in_value_and_float64_gradient(residual, name):
  """Block with size 3 over 4 sublayers: a block starts inside a layer, the replay merges a pending seal."""
  with jax.enable_x64(True):
    model = _model(residual, name)
    assert_loss_and_gradients_match(model, random_tokens(length=6), rule_reference_logits, leaf_tolerance=1e-8,
                                    global_floor=0.0)


@pytest.mark.slow
def test_table4_sliding_window_matches_the_literal_reference():
  """The Table 4 row as configured (`configs/ablations/sliding_window.py`: W = 8 over 32 sublayers), narrowed: the
  window slides over 24 sublayers here, where the case above (W = 2 over 4 sublayers) cuts one source at most."""
  model_config = sliding_window.get_config().model
  assert (model_config.residual, model_config.depth_window, 2 * model_config.num_layers) == ("full", 8, 32)
  with jax.enable_x64(True):
    model = make_model("full", num_layers=model_config.num_layers, depth_window=model_config.depth_window, d_model=8,
                       num_heads=2, num_kv_heads=2, d_ff=8, query_scale=0.5, dtype="float64", param_dtype="float64")
    # float64 rounding over 32 sublayers: up to 5e-14 in leaves whose largest entry is 1e-6 (jax 0.12)
    assert_loss_and_gradients_match(model, random_tokens(length=5), rule_reference_logits, leaf_tolerance=1e-8,
                                    global_floor=1e-12)
