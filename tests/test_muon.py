"""Muon (docs/method.md §15): orthogonalised updates for every per-layer matrix, AdamW's for the rest, exact resume."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax import axes
from attnres_jax.config_checks import check_run_config
from attnres_jax.sharding import make_mesh
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.loop import train_and_evaluate
from attnres_jax.train.metrics import read_metrics
from attnres_jax.train.optim import (ADAMW_UPDATE_RMS, decay_mask, learning_rate_schedule, make_optimizer,
                                     matrix_dimensions, muon_dimension_numbers)
from attnres_jax.train.resume import check_resume
from attnres_jax.train.state import abstract_train_state
from configs import smoke
from helpers import make_model

# Singular values of optax's quintic Newton-Schulz (5 steps) on matrices of condition <= 2: measured
# [0.682, 1.135]; square Gaussian matrices, whose smallest singular values are near 0, reach down to 0.15.
NS_BAND = (0.6, 1.2)
# Tiny models whose MLP gate is `[4, 8, 16]`; `block_params` adds the input-dependent query's projection.
SMALL = dict(num_layers=4, d_model=8, d_ff=16, num_heads=2, num_kv_heads=1)
MATRICES = {("depth", "query_projection")} | {("layers", "attention", name) for name in ("query", "key", "value", "out")
                                             } | {("layers", "mlp", name) for name in ("gate", "up", "down")}
ADAM_PARAMS = {"block": {("embedding",), ("head",), ("final_norm", "scale"), ("layers", "attention_norm", "scale"),
                         ("layers", "mlp_norm", "scale"), ("depth", "pseudo_query"), ("depth", "key_gain"),
                         ("depth", "output_query"), ("depth", "output_key_gain")},
               "mhc": {("embedding",), ("head",), ("hyper", "stream_projection"), ("hyper", "stream_gates"),
                       ("hyper", "stream_bias")}}


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("corpus_cache"))


@pytest.fixture(scope="module")
def block_params():
  """Parameters of a `SMALL` block model with every kind of per-layer matrix (built once: init is slow)."""
  return nnx.state(make_model("block", depth_query_projection=True, **SMALL), nnx.Param)


def muon_optim(**fields):
  """Smoke optimiser fields with Muon, no warmup and no clipping (one step's update is the rule's own)."""
  optim = smoke.get_config().optim
  optim.update(dict(name="muon", warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0))
  optim.update(fields)
  return optim


def matrix_axes(x, numbers) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(batch, input, output) axes of `x` under Muon dimension numbers."""
  matrix = tuple(numbers.reduction_axis) + tuple(numbers.output_axis)
  return tuple(a for a in range(x.ndim) if a not in matrix), tuple(numbers.reduction_axis), tuple(numbers.output_axis)


def as_matrices(x, numbers):
  """`x` as its stack of matrices `[batch, fan_in, fan_out]`."""
  groups = matrix_axes(x, numbers)
  return jnp.transpose(x, sum(groups, ())).reshape([math.prod(x.shape[a] for a in g) for g in groups])


def well_conditioned_like(x, numbers, rng: np.random.Generator) -> np.ndarray:
  """A random gradient shaped like `x` whose every matrix has random bases and singular values in [0.5, 1]."""
  groups = matrix_axes(x, numbers)
  b, m, n = (math.prod(x.shape[a] for a in g) for g in groups)
  k = min(m, n)
  u_BxMxK, v_BxNxK = (np.linalg.qr(rng.standard_normal((b, size, k)))[0] for size in (m, n))
  g_BxMxN = np.einsum("bmk,bk,bnk->bmn", u_BxMxK, rng.uniform(0.5, 1.0, (b, k)), v_BxNxK)
  order = sum(groups, ())
  return g_BxMxN.reshape([x.shape[a] for a in order]).transpose(np.argsort(order))


def flat(state) -> dict:
  return {path: variable.get_value() for path, variable in nnx.to_flat_state(state)}


def random_gradients(params, seed: int, well_conditioned=frozenset()):
  """Gaussian gradients of `params`; those in `well_conditioned` ({path: dimension numbers}) from
  `well_conditioned_like`."""
  rng = np.random.default_rng(seed)
  draw = lambda path, x: (well_conditioned_like(x, well_conditioned[path], rng) if path in well_conditioned
                          else rng.standard_normal(x.shape))
  return nnx.from_flat_state([(path, variable.replace(jnp.asarray(draw(path, variable.get_value()), jnp.float32)))
                              for path, variable in nnx.to_flat_state(params)])


def states_of(opt_state, kind) -> list:
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kind)) if isinstance(s, kind)]


def singular_values(matrices_BxMxN):
  return np.linalg.svd(np.asarray(matrices_BxMxN, np.float64), compute_uv=False)


@pytest.mark.parametrize("logical_axes,want", [
    ((axes.LAYERS, axes.EMBED, axes.HEADS, axes.HEAD_DIM), ((1,), (2, 3))),  # attention query
    ((axes.LAYERS, axes.HEADS, axes.HEAD_DIM, axes.EMBED), ((1, 2), (3,))),  # attention out
    ((axes.LAYERS, "expert", axes.EMBED, axes.MLP), ((2,), (3,))),  # MoE experts: one matrix per layer and expert
    ((axes.LAYERS, "expert", axes.MLP, axes.EMBED), ((2,), (3,))),
    ((axes.LAYERS, axes.EMBED, None), ((1,), (2,))),  # MoE router
    ((axes.VOCAB, axes.EMBED), None), ((axes.LAYERS, axes.EMBED), None),  # embedding, a norm
    ((axes.LAYERS, axes.SUBLAYER, axes.DEPTH_EMBED), None),  # pseudo-queries
])
def test_matrix_axes_come_from_logical_names(logical_axes, want):
  numbers = matrix_dimensions(logical_axes)
  assert (numbers if numbers is None else (tuple(numbers.reduction_axis), tuple(numbers.output_axis))) == want


def test_every_per_layer_matrix_gets_an_orthogonalised_update(block_params):
  params = block_params
  numbers = flat(muon_dimension_numbers(params))
  assert {path for path, n in numbers.items() if n is not None} == MATRICES
  grads = random_gradients(params, 0, {path: numbers[path] for path in MATRICES})
  optim = muon_optim()
  tx = make_optimizer(optim, 10)
  updates = flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
  adam = optax.adam(1.0)
  adam_updates = flat(jax.jit(adam.update)(grads, adam.init(params))[0])
  learning_rate = float(learning_rate_schedule(optim, 10)(0))
  for path in MATRICES:
    _, fan_in, fan_out = as_matrices(updates[path], numbers[path]).shape
    rms_scale = ADAMW_UPDATE_RMS * math.sqrt(max(fan_in, fan_out))  # Moonlight's matching (§15)
    s = singular_values(as_matrices(updates[path], numbers[path]) / (-learning_rate * rms_scale))
    assert NS_BAND[0] < s.min() and s.max() < NS_BAND[1], (path, s.min(), s.max())
    s_adam = singular_values(as_matrices(adam_updates[path], numbers[path]))  # sign-like: no scale fits the band
    assert s_adam.max() / s_adam.min() > NS_BAND[1] / NS_BAND[0], (path, s_adam.min(), s_adam.max())

  stacked = {"w": jnp.zeros((4, 8, 16))}  # optax's default rule: only 2-D parameters get Muon
  default = optax.contrib.muon(1e-3).init(stacked)
  assert states_of(default, optax.ScaleByAdamState)[0].mu["w"].shape == (4, 8, 16)
  assert isinstance(states_of(default, optax.contrib.MuonState)[0].mu["w"], optax.MaskedNode)
  gate = ("layers", "mlp", "gate")  # `[4, 8, 16]`: ours puts it in Muon's state
  ours = tx.init(params)
  assert flat(states_of(ours, optax.contrib.MuonState)[0].mu)[gate].shape == (4, 8, 16)
  assert all(isinstance(flat(s.mu)[gate], optax.MaskedNode) for s in states_of(ours, optax.ScaleByAdamState))


@pytest.mark.parametrize("residual", ["block", "mhc"])
def test_the_other_parameters_get_exactly_adamw_updates(residual, block_params):
  params = block_params if residual == "block" else nnx.state(make_model(residual, **SMALL), nnx.Param)
  optim = muon_optim(weight_decay=0.1)
  numbers = flat(muon_dimension_numbers(params))
  adam_params = {path for path, n in numbers.items() if n is None}
  assert adam_params >= ADAM_PARAMS[residual]
  adamw = optax.adamw(learning_rate_schedule(optim, 10), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=lambda p: decay_mask(p, optim.decay_embeddings))
  tx = make_optimizer(optim, 10)
  state, want_state = tx.init(params), adamw.init(params)
  for seed in range(2):
    grads = random_gradients(params, seed)
    updates, state = jax.jit(tx.update)(grads, state, params)
    want, want_state = jax.jit(adamw.update)(grads, want_state, params)
    updates, want = flat(updates), flat(want)
    for path in adam_params | ADAM_PARAMS[residual]:
      np.testing.assert_array_equal(updates[path], want[path], err_msg=str(path))


def test_weight_decay_reaches_the_muon_matrices_decoupled(block_params):
  params = block_params
  grads = jax.tree.map(jnp.ones_like, params)
  updates = {}
  for weight_decay in (0.0, 0.1):
    tx = make_optimizer(muon_optim(weight_decay=weight_decay), 10)
    updates[weight_decay] = flat(jax.jit(tx.update)(grads, tx.init(params), params)[0])
  learning_rate, weights = float(learning_rate_schedule(muon_optim(), 10)(0)), flat(params)
  for path in MATRICES:
    np.testing.assert_allclose(updates[0.1][path] - updates[0.0][path], -learning_rate * 0.1 * weights[path],
                               rtol=1e-5, atol=1e-9, err_msg=str(path))


@pytest.mark.parametrize("field,value", [("name", "sgd"), ("muon_momentum", 1.0), ("muon_ns_steps", 0),
                                         ("muon_match_adamw_rms", "yes")])
def test_invalid_muon_fields_name_the_field(field, value):
  config = smoke.get_config().to_dict()  # as a saved config.json: not type-checked on assignment
  config["optim"][field] = value
  with pytest.raises(ValueError, match=rf"config\.optim\.{field}="):
    check_run_config(config)


def test_switching_the_optimiser_is_a_run_change():
  saved = json.loads(smoke.get_config().to_json_best_effort())
  current = smoke.get_config()
  current.optim.name = "muon"
  with pytest.raises(ValueError, match="optim.name: 'adamw' -> 'muon'"):
    check_resume(saved, current, step=4)


def muon_config(cache_dir):
  config = smoke.get_config()
  config.data.cache_dir = cache_dir
  config.optim.name = "muon"
  config.train.update(dict(num_steps=24, log_every=1, eval_every=100, checkpoint_every=12, dynamics_every=0))
  return config


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, corpus_cache):
  """A 24-step Muon run of the smoke model (checkpoints 12 and 24), trained once."""
  workdir = str(tmp_path_factory.mktemp("muon") / "run")
  train_and_evaluate(muon_config(corpus_cache), workdir)
  return workdir


def test_a_muon_run_learns(muon_run):
  losses = train_losses(muon_run)
  first, last = (np.mean([losses[step] for step in steps]) for steps in (range(1, 4), range(22, 25)))
  assert last < first - 0.3, (first, last)  # measured: 5.53 -> 5.05 (jax 0.12), more on jax 0.10


def final_state(workdir, config):
  _, target = abstract_train_state(config, make_mesh(config.mesh), make_optimizer(config.optim, 24))
  checkpointer = Checkpointer(workdir, max_to_keep=3, async_checkpointing=False, read_only=True)
  state = checkpointer.restore_latest(target)
  checkpointer.close()
  return state


def test_a_muon_run_resumes_exactly(muon_run, corpus_cache, tmp_path):
  resumed = shutil.copytree(muon_run, str(tmp_path / "resumed"))
  shutil.rmtree(os.path.join(resumed, "checkpoints", "24"))  # as if stopped at step 12
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  config = muon_config(corpus_cache)
  train_and_evaluate(config, resumed)
  losses, want = train_losses(resumed), train_losses(muon_run)
  assert sorted(losses) == list(range(13, 25)) and all(losses[step] == want[step] for step in losses)
  got, expected = final_state(resumed, config), final_state(muon_run, config)
  assert int(got.step) == int(expected.step) == 24
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(got_leaf, want_leaf)
