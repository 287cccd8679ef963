"""Sharded training on fake CPU devices equals one device; shardings follow the rules; checkpoints move."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attnres_jax.sharding import activate, batch_sharding, check_mesh_fits, make_mesh
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.loss import next_token_loss
from attnres_jax.train.state import create_train_state
from attnres_jax.train.metrics import read_metrics
from configs import smoke
from helpers import REPO, run_main

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
TOKENS_BxT1 = np.random.default_rng(3).integers(0, 256, (8, 17), dtype=np.int32)  # numpy: the worker imports this
# Float32 gradients on a mesh against one device, per leaf, relative to its norm. Measured: up to 1e-5 with
# random depth queries (2e-7 for PreNorm); float32 itself is 6e-5 off the float64 gradient there. A wrong
# factor on a leaf is an error of its whole norm or more.
GRAD_TOL = 5e-5
# Depth parameters off their zero / one init (as tests/helpers.py `make_model`): (center, scale) of a normal.
RANDOM_DEPTH_PARAMS = {"pseudo_query": (0.0, 1.0), "output_query": (0.0, 1.0), "key_gain": (1.0, 1.0),
                       "output_key_gain": (1.0, 1.0), "query_projection": (0.0, 0.2)}


def sharded_config(mesh_shape, residual="block", extra_rules=(), **model_overrides):
  config = smoke.get_config()
  config.model.update(dict(residual=residual, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64, block_size=3))
  config.model.update(model_overrides)
  config.data.global_batch_size = 8
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  config.mesh.rules = tuple(extra_rules) + tuple(config.mesh.rules)
  return config


def randomise_depth_params(params):
  """`params` with random depth queries and gains, the same values on every mesh and process; shardings kept.

  Drawn on the host (nothing to compile) and placed shard by shard.
  """
  def draw(path, x):
    names = [getattr(k, "key", None) for k in path]
    if names[0] != "depth":
      return x
    center, scale = RANDOM_DEPTH_PARAMS[names[1]]
    rng = np.random.default_rng([100, sorted(RANDOM_DEPTH_PARAMS).index(names[1])])
    value = (center + scale * rng.standard_normal(x.shape)).astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(draw, params)


def sharded_loss_and_grads(config, mesh, batch_BxT1):
  """Train loss and its gradients (global arrays) at the randomised initial state, by the train step's code path:
  the state created on `mesh`, `value_and_grad` of `next_token_loss` jitted inside `activate`."""
  with activate(mesh, config.mesh.rules):
    graphdef, state = create_train_state(config, mesh, optax.sgd(0.0))
    params = randomise_depth_params(state.params)
    loss_fn = lambda params, tokens_BxT1: next_token_loss(nnx.merge(graphdef, params), tokens_BxT1)
    return jax.jit(jax.value_and_grad(loss_fn))(params, batch_BxT1)


@functools.lru_cache
def loss_and_grads(mesh_shape, residual, extra_rules=(), **model_overrides):
  """Loss and gradients (numpy, by key path) on `mesh_shape` for `TOKENS_BxT1`; cached (references repeat)."""
  config = sharded_config(mesh_shape, residual, extra_rules, **model_overrides)
  mesh = make_mesh(config.mesh)
  batch = jax.device_put(TOKENS_BxT1, batch_sharding(mesh, config.mesh.rules))
  loss, grads = sharded_loss_and_grads(config, mesh, batch)
  return float(loss), flat_numpy(grads)


def flat_numpy(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_gradients_match(got, want, tol=GRAD_TOL, floor=1e-3, context=""):
  """Each leaf: |got - want| <= tol (|want| + floor |all of want|), in float64 from float32 gradients.

  A wrong factor on a leaf fails here; the parameters after one Adam step (about lr sign(g)) can hide it. The
  floor, relative to the global gradient norm, is for leaves whose gradient is (nearly) zero: float32 noise.
  """
  assert sorted(got) == sorted(want), context
  norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))
  total = np.sqrt(sum(norm(w) ** 2 for w in want.values()))
  for name, w in want.items():
    error, size = norm(np.asarray(got[name], np.float64) - w), norm(w)
    assert error <= tol * (size + floor * total), (
        f"{context} {name}: |g - g_want| = {error:.3g} is {error / max(size, 1e-30):.3g} of |g_want| = {size:.3g} "
        f"(tolerance {tol}, global gradient norm {total:.3g})")


def assert_equals_one_device(mesh_shape, residual, extra_rules=(), reference=None, **model_overrides):
  """Loss and every gradient leaf on `mesh_shape` equal one device's (of `reference` overrides, default the same)."""
  want_loss, want = loss_and_grads((1, 1, 1), residual, **(model_overrides if reference is None else reference))
  loss, got = loss_and_grads(mesh_shape, residual, tuple(extra_rules), **model_overrides)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(mesh_shape))
  assert_gradients_match(got, want, context=str(mesh_shape))


@pytest.mark.parametrize("residual", [pytest.param("prenorm", marks=pytest.mark.slow), "block"])
def test_one_train_step_on_a_mesh_equals_one_device(residual):
  """The train step's loss and gradients, sharded over data, fsdp or all three axes, equal one device's."""
  for mesh_shape in MESHES:
    assert_equals_one_device(mesh_shape, residual)


@pytest.mark.parametrize("residual,overrides", [
    ("mhc", {}), pytest.param("full", dict(depth_query_projection=True), marks=pytest.mark.slow)])
def test_ablation_baselines_train_on_a_mesh_as_on_one_device(residual, overrides):
  """mHC's streams and the input-dependent query's projections, sharded over data x fsdp x tensor.

  On mHC's identical initial streams some gradients are rounding noise (the Sinkhorn Jacobian removes
  row-constant terms): the gradient floor of `assert_gradients_match` covers them.
  """
  assert_equals_one_device((2, 2, 2), residual, **overrides)


def test_pallas_kernel_runs_per_batch_shard_and_equals_xla_on_one_device():
  """The kernel is mapped over batch shards (GSPMD cannot split a Pallas call); the query gradients are summed
  over the shards, once: a factor on them fails here. Two shards: the Pallas TPU interpreter makes every
  device's callbacks meet at a barrier, and with eight devices on a loaded 2-core machine that rendezvous
  has timed out and aborted the process."""
  assert_equals_one_device((1, 2, 1), "block", reference={}, depth_attention_impl="pallas_interpret")


@pytest.mark.slow
def test_activation_width_split_over_tensor_keeps_key_norm_exact():
  """Activations and depth sources with d over `tensor`: the key RMSNorm and depth logits reduce over a
  sharded axis, and the loss and gradients still equal one device's."""
  assert_equals_one_device((2, 1, 4), "full", [("activation_embed", "tensor")])


def expected_spec(names, shape, rules, mesh_sizes):
  """The rules applied by hand, one rule after another: a rule gives its mesh axes to each dimension of its
  name unless one of them is taken already or the dimension's axes would no longer divide it."""
  taken, given = set(), {i: [] for i in range(len(names))}
  for rule_name, mapped in rules:
    mapped = [mapped] if isinstance(mapped, str) else list(mapped or [])
    for i in [i for i, name in enumerate(names) if name == rule_name and mapped]:
      if taken.isdisjoint(mapped) and shape[i] % int(np.prod([mesh_sizes[a] for a in given[i] + mapped])) == 0:
        given[i] += mapped
        taken.update(mapped)
  return PartitionSpec(*[None if not a else a[0] if len(a) == 1 else tuple(a) for a in given.values()])


def test_parameter_shardings_follow_logical_axes_and_rules():
  config = sharded_config((2, 2, 2))
  mesh = make_mesh(config.mesh)
  with activate(mesh, config.mesh.rules):
    _, state = create_train_state(config, mesh, optax.adamw(1e-2))
  rules, sizes = config.mesh.rules, dict(mesh.shape)
  model = nnx.eval_shape(lambda: __import__("attnres_jax").Transformer(config.model, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = variable.get_metadata()["out_sharding"]
    array = dict(nnx.to_flat_state(state.params))[path][...]
    want = NamedSharding(mesh, expected_spec(names, array.shape, rules, sizes))
    assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding.spec, want.spec)
  by_name = {"/".join(map(str, p)): v[...].sharding for p, v in nnx.to_flat_state(state.params)}
  is_spec = lambda name, *spec: by_name[name].is_equivalent_to(NamedSharding(mesh, PartitionSpec(*spec)), len(spec))
  assert is_spec("layers/attention/query", None, "fsdp", "tensor", None)
  assert is_spec("embedding", "tensor", "fsdp")
  assert is_spec("depth/pseudo_query", None, None, None)  # replicated
  mu = dict(nnx.to_flat_state(state.opt_state[0].mu))  # AdamW moments follow their parameters
  assert mu[("layers", "mlp", "gate")][...].sharding.is_equivalent_to(by_name["layers/mlp/gate"], 3)


@pytest.mark.parametrize("restore_mesh", [pytest.param((1, 1, 1), marks=pytest.mark.slow), (8, 1, 1)])
def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path, restore_mesh):
  tx = optax.adamw(1e-2)
  config = sharded_config((2, 2, 2))
  mesh = make_mesh(config.mesh)
  with activate(mesh, config.mesh.rules):
    _, saved_state = create_train_state(config, mesh, tx)
  iterator = iter(__import__("grain").MapDataset.range(10).to_iter_dataset())
  checkpointer = Checkpointer(str(tmp_path), max_to_keep=1, async_checkpointing=False)
  checkpointer.save(saved_state, iterator, run={})
  checkpointer.close()

  other = sharded_config(restore_mesh)
  other.train.seed = 1  # a different initialisation, overwritten by the restore
  other_mesh = make_mesh(other.mesh)
  with activate(other_mesh, other.mesh.rules):
    _, target = create_train_state(other, other_mesh, tx)
  restored = Checkpointer(str(tmp_path), max_to_keep=1, async_checkpointing=False).restore_latest(
      target, iterator)
  for got, want, like in zip(jax.tree.leaves(restored), jax.tree.leaves(saved_state), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == like.sharding


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


HOST_BY_HOST, ALTERNATING = (lambda d: d.id // 4), (lambda d: d.id % 2)  # 8 devices as 2 hosts x 4


@pytest.mark.parametrize("mesh_shape,process_of,problem", [
    pytest.param((2, 2, 2), HOST_BY_HOST, None, id="data_across_hosts"),
    pytest.param((1, 2, 4), HOST_BY_HOST, None, id="fsdp_across_hosts"),
    pytest.param((2, 2, 2), ALTERNATING, "batch shard rows 0-1 are held by devices of processes 0 and 1",
                 id="tensor_across_hosts"),  # data x fsdp = 4 is a multiple of 2 processes: not enough
    pytest.param((1, 1, 8), HOST_BY_HOST, "batch shard rows 0-7 are held by devices of processes 0 and 1",
                 id="one_shard_on_both_hosts"),
    pytest.param((4, 1, 1), HOST_BY_HOST, "the 2 processes hold [4, 0] of the 4 batch shards",
                 id="mesh_on_one_host"),
])
def test_a_mesh_is_refused_where_two_processes_would_feed_one_batch_shard(mesh_shape, process_of, problem):
  """Checked on the batch sharding's device-to-rows map, with fake process indices of the 8 devices."""
  config = sharded_config(mesh_shape)
  mesh = make_mesh(config.mesh)
  if problem is None:
    check_mesh_fits(config, mesh, process_count=2, process_of=process_of)
    return
  with pytest.raises(ValueError, match="^config.mesh=") as error:
    check_mesh_fits(config, mesh, process_count=2, process_of=process_of)
  assert problem in str(error.value)
  check_mesh_fits(config, mesh)  # one process feeds every shard


def test_micro_batches_must_split_over_data_and_fsdp():
  config = sharded_config((2, 2, 2))
  config.optim.grad_accum_steps = 4  # micro-batches of 2 rows over 4 batch devices
  with pytest.raises(ValueError, match="each of the 4 micro-batches must split over data x fsdp = 4"):
    check_mesh_fits(config, make_mesh(config.mesh))


def test_two_processes_of_four_devices_give_the_loss_and_gradients_of_one_device(tmp_path):
  """jax.distributed on localhost, 2 processes x 4 CPU devices, mesh (data=2, fsdp=2, tensor=2) over both
  (tests/multihost_worker.py): each process's rows land on its own devices; the loss and every gradient equal
  one device's (the global batch is a row permutation of it: the mean loss is invariant); meshes whose batch
  shards would span both processes are refused before compiling."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  command = [sys.executable, os.path.join("tests", "multihost_worker.py"), "--num_processes=2",
             f"--port={free_port()}", f"--out={tmp_path}"]
  workers = [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    want_loss, want = loss_and_grads((1, 1, 1), "block")  # meanwhile (cached if an earlier test made it)
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
  finally:
    for worker in workers:
      worker.kill()  # a no-op for one that has exited
  assert [worker.returncode for worker in workers] == [0, 0], outputs
  got = dict(np.load(tmp_path / "grads.npz"))
  np.testing.assert_allclose(got.pop("loss"), want_loss, rtol=1e-5)
  assert_gradients_match(got, want, context="2 processes x 4 devices")


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """The train command under jax.distributed on localhost, two processes of one CPU device each, data-parallel
  over both, logs the losses and gradient norms of one process and saves the same checkpoint steps."""
  common = ["--config.train.num_steps=6", "--config.train.log_every=1", "--config.train.eval_every=3",
            f"--config.data.cache_dir={tmp_path / 'cache'}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  single = tmp_path / "single"
  code, output = run_main(single, *common, env=env)
  assert code == 0, output
  port, multi = free_port(), tmp_path / "multi"
  processes = [run_main(multi, *common, "--config.mesh.data=2", "--config.distributed.initialize=True",
                        f"--config.distributed.coordinator_address=localhost:{port}",
                        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                        env=env, wait=False) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert "over 2 process(es)" in outputs[0]
  want, got = read_metrics(str(single)), read_metrics(str(multi))
  assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in want]
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
  train = lambda records: [r["grad_norm"] for r in records if r["split"] == "train"]
  np.testing.assert_allclose(train(got), train(want), rtol=1e-5)
  assert sorted(os.listdir(multi / "checkpoints")) == ["4", "6"]
  files = lambda: {str(p): p.stat().st_size for p in sorted(multi.rglob("*")) if p.is_file()}
  before = files()
  code, output = run_main(multi, *common, env=env)  # one process resumes a checkpoint of two: refused
  assert code == 1 and "error: The checkpoint at step 6" in output and "written by 2 process(es)" in output, output
  assert "Traceback" not in output and files() == before
