"""Ablation variants of the depth-mixing rule (spec section 7): each one's defining property, and every
config under `configs/ablations/` trains one step."""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax import depth_attention
from attnres_jax.residuals.mixing_rules import MixingRule, mix_sources, source_weights
from attnres_jax.train.loss import next_token_loss
from helpers import REPO, VOCAB, make_model, max_rel_error, random_tokens

ABLATIONS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs", "ablations"))
                   if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def random_sources(seed=0, num_sources=5, width=16):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  scales = jnp.exp(jax.random.normal(k3, (num_sources, 1, 1, 1)))
  return (scales * jax.random.normal(k1, (num_sources, 2, 3, width)), jax.random.normal(k2, (width,)))


def test_one_head_equals_the_spec_rule():
  sources, query = random_sources()
  visible = jnp.array([True, True, False, True, True])
  got = mix_sources(MixingRule(num_heads=1), sources, visible, query, 1e-6)
  want = depth_attention(sources, query, None, eps=1e-6, mask=jnp.broadcast_to(visible[:, None, None], (5, 2, 3)))
  assert max_rel_error(got, want) < 1e-5


def test_heads_softmax_separately_over_their_channel_groups():
  sources, query = random_sources()
  visible = jnp.ones(5, bool)
  weights = source_weights(MixingRule(num_heads=4), sources, visible, query, 1e-6)
  np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-6)
  group = mix_sources(MixingRule(num_heads=4), sources, visible, query, 1e-6)[..., 4:8]
  alone = depth_attention(sources[..., 4:8], query[4:8], None, eps=1e-6)  # its own group only
  assert max_rel_error(group, alone) > 1e-3  # the key norm still spans all of d
  keyed = sources * jax.lax.rsqrt(jnp.mean(sources**2, -1, keepdims=True) + 1e-6)
  logits = jnp.einsum("sbtc,c->sbt", keyed[..., 4:8], query[4:8])
  np.testing.assert_allclose(weights[..., 1], jax.nn.softmax(logits, axis=0), rtol=1e-5)


def test_key_norm_makes_weights_scale_invariant_and_its_ablation_does_not():
  sources, query = random_sources()
  visible, scaled = jnp.ones(5, bool), sources.at[2].multiply(10.0)
  weights = lambda rule, s: source_weights(rule, s, visible, query, 1e-6)
  np.testing.assert_allclose(weights(MixingRule(), scaled), weights(MixingRule(), sources), rtol=1e-5, atol=1e-7)
  off = MixingRule(key_norm=False)
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
