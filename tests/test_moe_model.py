"""MoE FFN layers in the transformer (docs/method.md §16): their auxiliary losses train the router through the
AttnRes custom VJP, expert parallelism equals one device, decoding, FLOPs and the configs."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax import Transformer
from attnres_jax.config_checks import check_run_config
from attnres_jax.sharding import activate, make_mesh
from attnres_jax.train.flops import forward_flops_per_token
from attnres_jax.train.loss import cross_entropy, training_loss
from attnres_jax.train.state import create_train_state
from configs import block, moe, scaling
from helpers import make_model, max_rel_error, random_tokens, run_main
from reference import reference_logits
from test_decode import decode_one_by_one

MOE = dict(num_experts=4, top_k=2, num_shared_experts=1, dense_layers=1, aux_loss_coef=0.1, z_loss_coef=0.01)


def moe_model(residual="block", **moe_overrides):
  """A tiny float64 model: 1 dense layer, then 2 MoE layers; random depth queries."""
  return make_model(residual, ffn="moe", d_ff=24, block_size=3, query_scale=0.5, dtype="float64",
                    param_dtype="float64", moe={**MOE, **moe_overrides})


@pytest.mark.parametrize("residual", ["block", pytest.param("prenorm", marks=pytest.mark.slow)])
def test_objective_and_gradients_equal_the_literal_loop_with_auxiliary_losses(residual):
  """float64: cross-entropy + the MoE layers' weighted balancing and z-losses, and every gradient (the router's
  included, which the auxiliary loss moves), equal autodiff of the literal depth loop."""
  with jax.enable_x64(True):
    model, tokens = moe_model(residual), random_tokens(length=9)

    def reference_objective(model):
      aux = []
      logits = reference_logits(model, tokens[:, :-1], aux_losses=aux)
      return cross_entropy(logits, tokens[:, 1:]) + sum(aux)

    objective = lambda model: training_loss(model, tokens)[0]
    (got, got_grads), (want, want_grads) = (nnx.jit(nnx.value_and_grad(f))(model)
                                            for f in (objective, reference_objective))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    want_flat = dict(nnx.to_flat_state(want_grads))
    for path, grad in nnx.to_flat_state(got_grads):
      np.testing.assert_allclose(grad[...], want_flat[path][...], rtol=0,
                                 atol=1e-9 * float(jnp.max(jnp.abs(want_flat[path][...]))) + 1e-14, err_msg=str(path))
    no_aux = moe_model(residual, aux_loss_coef=0.0, z_loss_coef=0.0)
    router = lambda grads: grads["layers"]["mlp"]["router"][...]
    without = nnx.grad(lambda m: training_loss(m, tokens)[0])(no_aux)
    assert max_rel_error(router(got_grads), router(without)) > 1e-3  # the auxiliary loss reaches the router
    assert float(jnp.max(jnp.abs(got_grads["layers"]["mlp"]["expert_bias"][...]))) == 0.0


@pytest.mark.parametrize("axes_sizes,local_experts", [
    (dict(data=2, expert=4), 2), pytest.param(dict(fsdp=2, expert=2, tensor=2), 4, marks=pytest.mark.slow)])
def test_expert_parallel_mesh_equals_one_device(axes_sizes, local_experts):
  """8 fake devices, data=2 x expert=4 (or fsdp=2 x expert=2 x tensor=2): the training objective and every
  gradient of an AttnRes MoE model equal one device's."""
  def objective_and_grads(mesh_axes):
    config = moe.get_config()
    config.model.update(dict(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, d_ff=32, vocab_size=64))
    config.model.moe.update(dict(num_experts=8, top_k=2, bias_update_rate=0.0))
    config.data.global_batch_size = 8
    config.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh_axes})
    mesh = make_mesh(config.mesh, jax.devices()[:int(np.prod(list(mesh_axes.values()) or [1]))])
    with activate(mesh, config.mesh.rules):
      graphdef, state = create_train_state(config, mesh, optax.sgd(0.0))
      loss = lambda params, tokens: training_loss(nnx.merge(graphdef, params), tokens)[0]
      value, grads = jax.jit(jax.value_and_grad(loss))(state.params, np.asarray(random_tokens(8, 17)))
      experts = grads["layers"]["mlp"]["gate"][...]
      local = experts.sharding.shard_shape(experts.shape)
    return value, {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}, local

  one_loss, one_grads, _ = objective_and_grads({})
  loss, grads, local = objective_and_grads(axes_sizes)
  assert local[1] == local_experts, (axes_sizes, local)  # each device holds E / expert of the experts
  np.testing.assert_allclose(loss, one_loss, rtol=1e-6)
  for path, want in one_grads.items():
    np.testing.assert_allclose(grads[path], want, rtol=0, atol=5e-5 * np.abs(want).max() + 1e-9, err_msg=path)


@pytest.mark.slow
def test_cached_decoding_of_an_moe_model_equals_the_full_forward():
  model = make_model("block", ffn="moe", d_ff=24, block_size=3, moe=MOE)
  tokens = random_tokens(length=11)
  assert max_rel_error(decode_one_by_one(model, tokens, 4, window=16), model(tokens)) < 1e-5


def test_flops_count_the_active_parameters():
  """configs/moe.py's experts multiply as many weights per token as the dense block config's SwiGLU: their
  matmul FLOPs differ by the router alone."""
  sparse, dense = moe.get_config().model, block.get_config().model
  routers = 2 * (sparse.num_layers - sparse.moe.dense_layers) * sparse.d_model * sparse.moe.num_experts
  difference = forward_flops_per_token(sparse, 128)["matmul"] - forward_flops_per_token(dense, 128)["matmul"]
  assert difference == routers
  total = sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(sparse, rngs=nnx.Rngs(0)), nnx.Param)))
  assert total > 1.5 * sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(dense, rngs=nnx.Rngs(0)),
                                                                       nnx.Param)))


@pytest.mark.parametrize("size", [name + scaling.MOE_SUFFIX for name in scaling.PAPER])
def test_paper_moe_sizes_are_valid_and_keep_the_dense_active_width(size):
  config = scaling.get_config(size)
  dense = scaling.get_config(size[:-len(scaling.MOE_SUFFIX)]).model
  check_run_config(config)
  active = config.model.d_ff * (config.model.moe.top_k + config.model.moe.num_shared_experts)
  assert dense.d_ff <= active < dense.d_ff + 7 * 128 and config.model.d_ff % 128 == 0


@pytest.mark.slow
def test_the_cpu_moe_config_trains_and_logs_expert_load(tmp_path):
  """configs/moe.py, shortened to 30 steps of shorter windows."""
  workdir = str(tmp_path / "moe")
  code, output = run_main(workdir, "--config.train.num_steps=30", "--config.optim.warmup_steps=10",
                          "--config.train.log_every=10", "--config.train.dynamics_every=20",
                          "--config.train.eval_every=30", "--config.train.eval_batches=2",
                          "--config.train.checkpoint_every=30", "--config.data.seq_len=32", config="configs/moe.py")
  assert code == 0, output
  with open(os.path.join(workdir, "metrics.jsonl")) as lines:
    train = [record for record in map(json.loads, lines) if record.get("split") == "train"]
  assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
  assert {"moe_aux_loss", "moe_z_loss", "moe_max_load", "moe_dropped_fraction"} <= set(train[-1])
  with open(os.path.join(workdir, "dynamics.jsonl")) as lines:
    load = np.asarray(json.loads(lines.readline())["expert_load"])
  assert load.shape == (3, 8) and np.allclose(load.sum(axis=1), 1.0)  # 3 MoE layers after the dense one


def test_moe_config_errors():
  config = moe.get_config()
  config.mesh.expert = 3
  with pytest.raises(ValueError, match=r"config\.model\.moe\.num_experts=8: must be divisible by the expert mesh "
                     r"axis \(3 devices\)"):
    check_run_config(config)
  config = moe.get_config()
  config.model.moe.dense_layers = 4
  with pytest.raises(ValueError, match=r"config\.model\.moe\.dense_layers=4"):
    check_run_config(config)
  config = moe.get_config()
  config.model.moe.top_k = 9
  with pytest.raises(ValueError, match=r"config\.model\.moe\.top_k=9"):
    check_run_config(config)
  assert importlib.import_module("configs.moe").get_config().model.ffn == "moe"
