"""Tiny models and inputs shared by the tests."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnres_jax import Transformer
from attnres_jax.train.loss import cross_entropy, next_token_loss
from configs import base

VOCAB = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(residual: str = "block", **overrides):
  config = base.get_config().model
  config.update(dict(vocab_size=VOCAB, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                     d_ff=48, residual=residual, block_size=2))
  config.update(overrides)
  return config


def make_model(residual: str = "block", seed: int = 0, random_queries: bool = True, query_scale: float = 1.0,
               **overrides):
  """A tiny model; by default with random pseudo-queries and gains (not the zero init)."""
  model = Transformer(tiny_config(residual, **overrides), rngs=nnx.Rngs(seed))
  if random_queries and model.depth is not None:
    keys = iter(jax.random.split(jax.random.key(seed + 100), 4))
    for name, center in (("pseudo_query", 0.0), ("output_query", 0.0),
                         ("key_gain", 1.0), ("output_key_gain", 1.0)):
      variable = getattr(model.depth, name)
      if variable is not None:
        value = variable[...]
        variable[...] = center + query_scale * jax.random.normal(next(keys), value.shape, value.dtype)
  return model


def move_ablation_params_off_init(model, projection_scale: float):
  """After `make_model`: raw (DenseFormer) weights around their init of 1, not cancelling sums, and a random
  input-dependent query projection of `projection_scale`, so that the ablations' own parameters are checked."""
  if model.mixing.rule.normalization == "none":
    for weights in (model.depth.pseudo_query, model.depth.output_query):
      weights[...] = weights[...] + 1.0
  if model.depth.query_projection is not None:
    shape = model.depth.query_projection[...].shape
    model.depth.query_projection[...] = projection_scale * jax.random.normal(jax.random.key(7), shape)
  return model


def assert_loss_and_gradients_match(model, tokens_BxT1, reference_logits_fn, leaf_tolerance=1e-4,
                                    global_floor=1e-5):
  """The model's loss and gradients (jitted, custom VJPs) equal autodiff through `reference_logits_fn(model, x)`.

  Each gradient leaf within `leaf_tolerance` of its own largest entry, plus `global_floor` of the largest
  gradient (the float32 noise floor; 0 in float64).
  """
  def reference_loss(model, tokens_BxT1):
    return cross_entropy(reference_logits_fn(model, tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])

  loss, grads = nnx.jit(nnx.value_and_grad(next_token_loss))(model, tokens_BxT1)
  want_loss, want_grads = nnx.jit(nnx.value_and_grad(reference_loss))(model, tokens_BxT1)
  np.testing.assert_allclose(loss, want_loss, rtol=min(1e-6, 100 * leaf_tolerance))
  flat_want = dict(nnx.to_flat_state(want_grads))
  floor = global_floor * max(float(jnp.max(jnp.abs(g[...]))) for g in flat_want.values())
  for path, got in nnx.to_flat_state(grads):
    want = flat_want[path][...]
    np.testing.assert_allclose(got[...], want, rtol=0, atol=leaf_tolerance * float(jnp.max(jnp.abs(want))) + floor,
                               err_msg=str(path))


def random_tokens(batch: int = 2, length: int = 8, seed: int = 1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def max_rel_error(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def run_main(workdir, *overrides, wait=True, env=None, config="configs/smoke.py"):
  """`python -m attnres_jax.main` with the smoke config (or `config`); (exit code, output), or the process if
  not `wait`."""
  command = [sys.executable, "-m", "attnres_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
  if not wait:
    return process
  output, _ = process.communicate(timeout=300)
  return process.returncode, output
