"""depth_attention against a plain per-token, per-source loop (docs/method.md §2, §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnres_jax import depth_attention
from attnres_jax.kernels.depth_attention_reference import attend, inverse_rms, merge_source


def naive_depth_attention(sources, query, gain, eps, mask):
  """sum_i softmax_i(w . RMSNorm(v_i)) v_i, one token and one source at a time, float64."""
  sources = np.asarray(sources, np.float64)
  num_sources, batch, length, width = sources.shape
  out = np.zeros((batch, length, width))
  gain = np.ones(width) if gain is None else np.asarray(gain, np.float64)
  for b in range(batch):
    for t in range(length):
      logits, values = [], []
      for i in range(num_sources):
        if mask is not None and not mask[i, b, t]:
          continue
        v = sources[i, b, t]
        key = gain * v / np.sqrt(np.mean(v * v) + eps)
        logits.append(float(np.dot(np.asarray(query, np.float64), key)))
        values.append(v)
      weights = np.exp(np.array(logits) - max(logits))
      weights /= weights.sum()
      out[b, t] = sum(w * v for w, v in zip(weights, values))
  return out


def random_inputs(seed, num_sources=5, width=16, dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  scales = jnp.exp(jax.random.normal(k4, (num_sources, 1, 1, 1)))  # sources of very different size
  sources = (scales * jax.random.normal(k1, (num_sources, 2, 3, width))).astype(dtype)
  query = jax.random.normal(k2, (width,)).astype(dtype)
  gain = (1.0 + 0.5 * jax.random.normal(k3, (width,))).astype(dtype)
  return sources, query, gain


@pytest.mark.parametrize("use_gain", [True, False])
@pytest.mark.parametrize("use_mask", [True, False])
def test_float32_matches_naive_loop(use_gain, use_mask):
  sources, query, gain = random_inputs(0)
  mask = None
  if use_mask:
    mask = np.random.default_rng(0).random(sources.shape[:-1]) < 0.6
    mask[0] = True  # every token keeps at least one source
  got = depth_attention(sources, query, gain if use_gain else None, eps=1e-6, mask=mask)
  want = naive_depth_attention(sources, query, gain if use_gain else None, 1e-6, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_match_naive_loop_on_rounded_values():
  sources, query, gain = random_inputs(1, dtype=jnp.bfloat16)
  mask = np.ones(sources.shape[:-1], bool)
  mask[2, 0] = False
  got = depth_attention(sources, query, gain, eps=1e-6, mask=mask)
  assert got.dtype == jnp.bfloat16
  want = naive_depth_attention(np.asarray(sources, np.float64), np.asarray(query, np.float64),
                               np.asarray(gain, np.float64), 1e-6, mask)
  # float32 internally: the only error left is rounding the result to bfloat16.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def test_masked_sources_get_no_weight_and_no_gradient():
  sources, query, gain = random_inputs(2)
  mask = np.array([True, True, False, True, False])[:, None, None]
  loss = lambda s: jnp.sum(depth_attention(s, query, gain, mask=mask) ** 2)
  grads = jax.grad(loss)(sources)
  assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[4]) == 0)
  assert np.any(np.asarray(grads[0]) != 0)
  np.testing.assert_allclose(loss(sources), loss(sources.at[2].mul(100.0)), rtol=1e-6)


def test_zero_query_gives_uniform_average():
  sources, _, gain = random_inputs(3)
  got = depth_attention(sources, jnp.zeros(sources.shape[-1]), gain)
  np.testing.assert_allclose(got, sources.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_key_norm_makes_logits_scale_invariant():
  """Scaling one source changes its value, not its weight (the key RMSNorm's job)."""
  sources, query, gain = random_inputs(4)
  _, _, weights = attend(sources, inverse_rms(sources, 0.0), query * gain)
  _, _, weights_scaled = attend(sources.at[1].mul(1e3), inverse_rms(sources.at[1].mul(1e3), 0.0), query * gain)
  np.testing.assert_allclose(weights, weights_scaled, rtol=1e-4, atol=1e-6)


def test_merging_one_source_by_lse_equals_joint_softmax():
  """docs/method.md §6: phase-1 statistics merged with one more source are exact."""
  sources, query, gain = random_inputs(5)
  inv = inverse_rms(sources, 1e-6)
  mixture, lse, _ = attend(sources[:-1], inv[:-1], query * gain)
  logit = jnp.einsum("btd,d->bt", sources[-1], query * gain) * inv[-1]
  merged, _ = merge_source(mixture, lse, sources[-1], logit)
  np.testing.assert_allclose(merged, depth_attention(sources, query, gain), rtol=1e-5, atol=1e-6)


def test_sources_without_token_axes():
  sources, query, gain = random_inputs(6)
  flat = sources[:, 0, 0]  # [num_sources, d]
  np.testing.assert_allclose(depth_attention(flat, query, gain),
                             depth_attention(sources, query, gain)[0, 0], rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_a_clear_error():
  sources, query, gain = random_inputs(7)
  with pytest.raises(ValueError, match="query shape"):
    depth_attention(sources, query[:-1])
  with pytest.raises(ValueError, match="gain shape"):
    depth_attention(sources, query, gain[:-1])
