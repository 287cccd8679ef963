"""The model computes exactly docs/method.md §2-§5, is causal, and runs in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_model, max_rel_error, random_tokens
from reference import full_reference_logits, reference_logits


@pytest.mark.parametrize("residual,block_size", [
    ("prenorm", 1), ("full", 1), ("block", 1), ("block", 2), ("block", 3),
    ("block", 4),  # 6 sublayers: the last block is short
    ("block", 6),  # one block
])
def test_logits_match_literal_spec(residual, block_size):
  model = make_model(residual, block_size=block_size)
  tokens = random_tokens()
  # float32 rounding: the loop merges a slot sealed within a layer by log-sum-exp, the reference re-mixes it
  # (in float64 they agree below float32 resolution); measured up to 1.4e-5 here
  assert max_rel_error(model(tokens), reference_logits(model, tokens)) < 3e-5


def test_block_size_one_equals_full():
  block, full = make_model("block", block_size=1), make_model("full")
  tokens = random_tokens()
  want = full_reference_logits(full, tokens)  # docs/method.md §3, written independently of blocks
  assert max_rel_error(full(tokens), want) < 1e-5
  assert max_rel_error(block(tokens), want) < 1e-5


@pytest.mark.parametrize("residual,block_size", [("full", 1), ("block", 2), ("block", 3), ("block", 6)])
def test_zero_init_queries_compute_prenorm(residual, block_size):
  """A zero query averages the sources; every consumer starts with a scale-invariant norm."""
  tokens = random_tokens()
  baseline = make_model("prenorm", norm_eps=1e-12)
  model = make_model(residual, block_size=block_size, norm_eps=1e-12, random_queries=False)
  assert max_rel_error(model(tokens), baseline(tokens)) < 1e-4


def visible_sources(num_sublayers, block_size):
  """docs/method.md §4 as a table: (sealed slots, sees partial) for each sublayer, then the output."""
  rows = [(l // block_size + 1, l % block_size != 0) for l in range(num_sublayers)]
  return rows + [(-(-num_sublayers // block_size), True)]


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 6])
def test_source_sets_follow_spec(block_size):
  """With zero queries every visible source gets weight 1/count, every other exactly 0."""
  model = make_model("block", block_size=block_size, random_queries=False)
  _, stats = model(random_tokens(), return_stats=True)
  weights = np.concatenate([stats["depth_weights"], stats["output_depth_weights"][None]])
  num_slots = weights.shape[1] - 1
  assert num_slots == -(-model.num_sublayers // block_size)
  for row, (sealed, sees_partial) in zip(weights, visible_sources(model.num_sublayers, block_size)):
    want = np.zeros(num_slots + 1)
    want[:sealed] = 1.0
    want[-1] = float(sees_partial)
    np.testing.assert_allclose(row, want / want.sum(), atol=1e-6)


@pytest.mark.parametrize("block_size", [2, 4])
def test_recorded_source_sets_of_the_literal_reference(block_size):
  """The reference the model is compared against attends to the sources of docs/method.md §4."""
  model = make_model("block", block_size=block_size)
  recorded = []
  reference_logits(model, random_tokens(), record_sources=recorded)
  for sources, (sealed, sees_partial) in zip(recorded, visible_sources(model.num_sublayers, block_size)):
    assert len(sources) == sealed + int(sees_partial)


@pytest.mark.parametrize("residual", ["prenorm", "full", "block"])
def test_causal(residual):
  model = make_model(residual, block_size=3)
  tokens = random_tokens(length=10)
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
  before, after = model(tokens), model(changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert not np.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("residual", ["prenorm", "full", "block"])
def test_bfloat16_activations_track_float32(residual):
  tokens = random_tokens()
  fp32 = make_model(residual)
  bf16 = make_model(residual, dtype="bfloat16")
  logits = bf16(tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert max_rel_error(logits, fp32(tokens)) < 3e-2
  probs32, probs16 = jax.nn.softmax(fp32(tokens)), jax.nn.softmax(logits)
  assert float(jnp.max(jnp.abs(probs32 - probs16))) < 1e-2


@pytest.mark.parametrize("residual", ["prenorm", "block"])
def test_stats_do_not_change_logits(residual):
  model = make_model(residual)
  tokens = random_tokens()
  logits, stats = model(tokens, return_stats=True)
  np.testing.assert_allclose(logits, model(tokens), rtol=1e-6, atol=1e-6)
  assert stats["input_rms"].shape == stats["output_rms"].shape == (model.num_sublayers,)
  if residual == "block":
    np.testing.assert_allclose(stats["depth_weights"].sum(axis=1), 1.0, rtol=1e-5)
