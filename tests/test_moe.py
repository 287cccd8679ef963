"""The MoE FFN layer: a loop over tokens and experts, its losses, bias balancing, expert parallelism, megablox."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attnres_jax.model.layers import SwiGLU
from attnres_jax.model.moe import (MoE, MoESpec, active_params_per_token, check_moe_spec, resolve_impl, route,
                                   updated_expert_bias)
from attnres_jax.sharding import MESH_AXES, activate, make_mesh, param_shardings
from configs import base

D_MODEL = 16
RULES = base.get_config().mesh.rules


def make_moe(spec: MoESpec, dtype=jnp.float64, seed: int = 0, bias_scale: float = 0.05) -> MoE:
  """A MoE with a router large enough to make routing decisive and a random selection bias."""
  moe = MoE(D_MODEL, spec, init_std=0.5, out_std=0.3, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
  moe.expert_bias[...] = bias_scale * jax.random.normal(jax.random.key(seed + 1), moe.expert_bias.shape,
                                                        moe.expert_bias.dtype)
  return moe


def tokens(batch: int = 2, seq_len: int = 8, dtype=jnp.float64, seed: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, seq_len, D_MODEL), dtype)


def swiglu(x_D, gate_DxF, up_DxF, down_FxD):
  h = x_D @ gate_DxF
  return (h / (1 + np.exp(-h)) * (x_D @ up_DxF)) @ down_FxD


def loop_reference(moe: MoE, x_BxTxD) -> tuple[np.ndarray, np.ndarray, float]:
  """Output, expert load and dropped fraction, token by token and expert by expert, in numpy float64."""
  spec = moe.spec
  p = {name: np.asarray(getattr(moe, name)[...], np.float64) for name in ("router", "expert_bias", "gate", "up",
                                                                           "down")}
  x = np.asarray(x_BxTxD, np.float64)
  batch, seq_len, _ = x.shape
  chosen, gates = np.zeros((batch, seq_len, spec.top_k), int), np.zeros((batch, seq_len, spec.top_k))
  for b in range(batch):
    for t in range(seq_len):
      logits = x[b, t] @ p["router"]
      scores = np.exp(logits) / np.exp(logits).sum() if spec.score_function == "softmax" else 1 / (1 + np.exp(-logits))
      chosen[b, t] = np.argsort(-(scores + p["expert_bias"]))[:spec.top_k]
      gates[b, t] = scores[chosen[b, t]]
      if spec.normalize_top_k:
        gates[b, t] /= gates[b, t].sum()
  load = np.bincount(chosen.reshape(-1), minlength=spec.num_experts) / chosen.size
  keep = np.ones_like(gates, bool)
  if spec.capacity_factor:
    capacity = int(np.ceil(spec.capacity_factor * seq_len * spec.top_k / spec.num_experts))
    for b in range(batch):
      taken = np.zeros(spec.num_experts, int)
      for k in range(spec.top_k):  # first choices first, then by position
        for t in range(seq_len):
          e = chosen[b, t, k]
          keep[b, t, k] = taken[e] < capacity
          taken[e] += 1
  out = np.zeros_like(x)
  for b in range(batch):
    for t in range(seq_len):
      for k in range(spec.top_k):
        e = chosen[b, t, k]
        if keep[b, t, k]:
          out[b, t] += spec.routed_scaling_factor * gates[b, t, k] * swiglu(x[b, t], p["gate"][e], p["up"][e],
                                                                             p["down"][e])
      if moe.shared is not None:
        out[b, t] += swiglu(x[b, t], *(np.asarray(getattr(moe.shared, n)[...]) for n in ("gate", "up", "down")))
  return out, load, 1 - keep.mean()


@pytest.mark.parametrize("spec", [
    MoESpec(num_experts=6, top_k=2, d_ff=8),
    MoESpec(num_experts=6, top_k=3, d_ff=8, normalize_top_k=False, num_shared_experts=2, routed_scaling_factor=2.5),
    MoESpec(num_experts=5, top_k=2, d_ff=8, score_function="sigmoid", num_shared_experts=1),
    MoESpec(num_experts=5, top_k=1, d_ff=8, score_function="sigmoid", normalize_top_k=False),
    MoESpec(num_experts=4, top_k=2, d_ff=8, num_shared_experts=1, capacity_factor=0.75),
    MoESpec(num_experts=4, top_k=3, d_ff=8, score_function="sigmoid", capacity_factor=1.0),
], ids=lambda spec: f"{spec.score_function}-k{spec.top_k}-norm{int(spec.normalize_top_k)}-"
                    f"shared{spec.num_shared_experts}-cap{spec.capacity_factor}")
def test_moe_equals_a_loop_over_tokens_and_experts(spec):
  with jax.enable_x64(True):
    moe, x = make_moe(spec), tokens()
    out, outputs = nnx.jit(lambda moe, x: moe(x))(moe, x)
    want, load, dropped = loop_reference(moe, x)
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(outputs.expert_load_E, load, rtol=1e-12)
  np.testing.assert_allclose(outputs.dropped_fraction, dropped, atol=1e-12)
  assert (dropped > 0) == (spec.capacity_factor > 0)  # the capacity cases do drop slots


def test_one_expert_top_one_is_the_dense_swiglu():
  spec = MoESpec(num_experts=1, top_k=1, d_ff=12)
  with jax.enable_x64(True):
    moe, x = make_moe(spec), tokens()
    dense = SwiGLU(D_MODEL, 12, init_std=0.1, out_std=0.1, dtype=jnp.float64, param_dtype=jnp.float64,
                   rngs=nnx.Rngs(5))
    for name in ("gate", "up", "down"):
      getattr(dense, name)[...] = getattr(moe, name)[...][0]
    np.testing.assert_allclose(nnx.jit(lambda moe, x: moe(x)[0])(moe, x), nnx.jit(dense)(x), rtol=1e-12,
                               atol=1e-14)


def test_aux_and_z_losses_equal_their_formulas_and_the_aux_gradient_reaches_the_router():
  spec = MoESpec(num_experts=6, top_k=2, d_ff=8)
  with jax.enable_x64(True):
    moe, x = make_moe(spec), tokens()
    router, bias = moe.router[...], moe.expert_bias[...]
    x_NxD = np.asarray(x).reshape(-1, D_MODEL)

    def aux_formula(router_DxE):
      logits = x_NxD @ np.asarray(router_DxE)
      probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
      chosen = np.argsort(-(probs + np.asarray(bias)), axis=-1)[:, :spec.top_k]
      f = np.bincount(chosen.reshape(-1), minlength=spec.num_experts) / chosen.size
      return spec.num_experts * np.sum(f * probs.mean(0)), np.mean(np.log(np.exp(logits).sum(-1)) ** 2)

    outputs = route(x, router, bias, spec).outputs
    want_aux, want_z = aux_formula(router)
    np.testing.assert_allclose(outputs.aux_loss, want_aux, rtol=1e-12)
    np.testing.assert_allclose(outputs.z_loss, want_z, rtol=1e-12)
    grad = jax.grad(lambda r: route(x, r, bias, spec).outputs.aux_loss)(router)
    eps, numeric = 1e-6, np.zeros(router.shape)
    for i, j in np.ndindex(*router.shape):
      step = np.zeros(router.shape)
      step[i, j] = eps
      numeric[i, j] = (aux_formula(router + step)[0] - aux_formula(router - step)[0]) / (2 * eps)
  assert np.abs(grad).max() > 1e-3
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_the_selection_bias_gets_no_gradient_and_moves_only_the_choice():
  spec = MoESpec(num_experts=6, top_k=2, d_ff=8)
  with jax.enable_x64(True):
    moe, x = make_moe(spec), tokens()
    def total(moe, x):
      out, outputs = moe(x)
      return jnp.sum(out ** 2) + outputs.aux_loss + outputs.z_loss

    grads = nnx.grad(total)(moe, x)
  assert np.all(np.asarray(grads.expert_bias[...]) == 0)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in (grads.router[...], grads.gate[...], grads.down[...]))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_bias_updates_balance_a_skewed_router(score_function):
  """A router favouring high-numbered experts: 300 sign steps of the selection bias bring every expert's
  load near its share (max / min load 5.9 -> at most 1.35)."""
  spec = MoESpec(num_experts=8, top_k=2, d_ff=8, score_function=score_function, bias_update_rate=1e-3)
  u_D = jax.random.normal(jax.random.key(6), (D_MODEL,)) / np.sqrt(D_MODEL)
  x = tokens(batch=16, seq_len=32, dtype=jnp.float32) + u_D  # every token shares the direction u
  router = 0.3 * jax.random.normal(jax.random.key(7), (D_MODEL, 8)) + u_D[:, None] * jnp.arange(8) / 2
  load_of = jax.jit(lambda bias: route(x, router, bias, spec).outputs.expert_load_E)
  step = jax.jit(lambda bias: updated_expert_bias(bias, load_of(bias), spec.bias_update_rate))
  bias = jnp.zeros(8)
  before = load_of(bias)
  for _ in range(300):
    bias = step(bias)
  after = load_of(bias)
  ratio = lambda load: float(load.max() / load.min())
  assert ratio(before) > 5 and ratio(after) < 1.35, (before, after)


def mesh_of(**sizes) -> Mesh:
  return make_mesh(ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, expert=1, tensor=1), **sizes)))


def loss_and_grads(moe: MoE, x_BxTxD, mesh: Mesh | None):
  """((loss, output), parameter gradients, jaxpr) of a weighted output sum + the balancing losses, jitted; on
  `mesh` the parameters are laid out by the default rules and the layer runs inside `activate`."""
  graphdef, state = nnx.split(moe)
  weights_BxTxD = jnp.cos(jnp.arange(x_BxTxD.size, dtype=x_BxTxD.dtype)).reshape(x_BxTxD.shape)

  def loss(state, x_BxTxD):
    out, outputs = nnx.merge(graphdef, state)(x_BxTxD)
    return jnp.sum(out * weights_BxTxD) + outputs.aux_loss + 0.1 * outputs.z_loss, out

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  if mesh is None:
    return *step(state, x_BxTxD), jax.make_jaxpr(step)(state, x_BxTxD)
  state = jax.device_put(state, param_shardings(state, mesh, RULES))
  with activate(mesh, RULES):
    return *step(state, x_BxTxD), jax.make_jaxpr(step)(state, x_BxTxD)


def grouped_matmul_shapes(jaxpr) -> list[tuple[int, ...]]:
  """The weight shapes of every ragged_dot in a (nested) jaxpr: per device inside shard_map."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "ragged_dot_general" and eqn.invars[1].aval.ndim == 3:  # not a weight gradient
      found.append(eqn.invars[1].aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += grouped_matmul_shapes(sub)
  return found


@pytest.mark.parametrize("sizes,batch,capacity_factor,local_weight", [
    (dict(data=2, expert=4), 8, 0.0, (2, 16, 8)),
    (dict(fsdp=2, expert=2, tensor=2), 8, 0.0, (4, 16, 4)),
    (dict(data=2, expert=4), 8, 1.0, (2, 16, 8)),
    (dict(data=2, expert=4), 2, 0.0, (2, 16, 8)),  # 2 rows do not split over 8: experts split, partial sums
], ids=["data2-expert4", "fsdp2-expert2-tensor2", "capacity", "batch-not-split"])
def test_expert_parallel_mesh_equals_one_device(sizes, batch, capacity_factor, local_weight):
  """Outputs and every gradient on a mesh equal one device's; each device multiplies only its own experts'
  weights (the ragged_dot inside shard_map sees E / expert of them, and d_ff / tensor of their width)."""
  spec = MoESpec(num_experts=8, top_k=2, d_ff=8, num_shared_experts=1, capacity_factor=capacity_factor,
                 impl="ragged_dot")
  with jax.enable_x64(True):
    moe, x = make_moe(spec), tokens(batch=batch)
    (want_loss, want_out), want, _ = loss_and_grads(moe, x, None)
    (loss, out), got, jaxpr = loss_and_grads(moe, x, mesh_of(**sizes))
  assert set(grouped_matmul_shapes(jaxpr.jaxpr)) == {local_weight, local_weight[:1] + local_weight[:0:-1]}
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
  for (path, g), (_, w) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
    np.testing.assert_allclose(g[...], w[...], rtol=1e-10, atol=1e-12, err_msg=str(path))


@pytest.mark.parametrize("sizes,capacity_factor", [
    pytest.param(None, 0.0, marks=pytest.mark.slow, id="one-device-dropless"),  # 13 s
    pytest.param(dict(expert=2), 1.0, id="expert2-capacity")])
def test_megablox_interpret_equals_ragged_dot(sizes, capacity_factor):
  """The Pallas grouped matmul (TPU kernel, interpreted) against ragged_dot: outputs and gradients, float32.
  Slots are padded to the kernel's 128-row tiles; widths below a tile are masked inside the kernel. On two
  devices it runs inside the expert-parallel shard_map."""
  spec = MoESpec(num_experts=4, top_k=2, d_ff=8, capacity_factor=capacity_factor, impl="ragged_dot")
  moe, x = make_moe(spec, dtype=jnp.float32), tokens(dtype=jnp.float32)
  mesh = None if sizes is None else mesh_of(**sizes)
  (want_loss, want_out), want, _ = loss_and_grads(moe, x, mesh)
  moe.spec = dataclasses.replace(spec, impl="megablox_interpret")
  (loss, out), got, jaxpr = loss_and_grads(moe, x, mesh)
  assert "pallas_call" in str(jaxpr)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for (path, g), (_, w) in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
    np.testing.assert_allclose(g[...], w[...], rtol=1e-4, atol=1e-5, err_msg=str(path))


def tpu_mesh(shape) -> Mesh:
  """Abstract v5e chips (nothing runs on them; programs compile for them with libtpu's compiler)."""
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def test_auto_picks_megablox_when_compiling_for_tpu():
  assert resolve_impl("auto") == "ragged_dot"  # this CPU host
  with activate(tpu_mesh((1, 1, 4, 1)), RULES):
    assert resolve_impl("auto") == "megablox"
  assert resolve_impl("megablox_interpret") == "megablox_interpret"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 4, 1), (1, 1, 2, 2)], ids=["expert4", "expert2-tensor2"])
def test_megablox_compiles_for_tpu_inside_the_expert_parallel_shard_map(shape):
  """Forward and backward through Mosaic (its block-shape and VMEM checks), bfloat16, 15 s each."""
  mesh, spec = tpu_mesh(shape), MoESpec(num_experts=8, top_k=2, d_ff=256, num_shared_experts=1, impl="auto")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: MoE(256, spec, init_std=0.02, out_std=0.01,
                                                          dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                          rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                        param_shardings(params, mesh, RULES))
  x = jax.ShapeDtypeStruct((8, 512, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert"), None, None)))

  def loss(params, x):
    out, outputs = nnx.merge(graphdef, params)(x)
    return jnp.sum(out.astype(jnp.float32)) + outputs.aux_loss

  with activate(mesh, RULES):
    traced = jax.jit(jax.value_and_grad(loss)).trace(params, x)
    assert "pallas_call" in str(traced.jaxpr)
    traced.lower().compile()


def test_active_params_per_token_counts_router_top_k_and_shared_experts():
  spec = MoESpec(num_experts=8, top_k=2, d_ff=8, num_shared_experts=2)
  moe = nnx.eval_shape(lambda: MoE(D_MODEL, spec, init_std=0.5, out_std=0.3, dtype=jnp.float32,
                                   param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  size = lambda *params: sum(math.prod(p.get_value().shape) for p in params)
  routed = size(moe.gate, moe.up, moe.down) // spec.num_experts * spec.top_k
  want = size(moe.router) + routed + size(moe.shared.gate, moe.shared.up, moe.shared.down)
  assert active_params_per_token(D_MODEL, spec) == want


GOOD = MoESpec(num_experts=8, top_k=2, d_ff=16)


@pytest.mark.parametrize("field,value,problem", [
    ("num_experts", 0, "must be a positive integer"),
    ("top_k", 9, r"must be an integer in \[1, num_experts=8\]"),
    ("top_k", 0, r"must be an integer in \[1, num_experts=8\]"),
    ("d_ff", 2.5, "must be a positive integer"),
    ("num_shared_experts", -1, "must be an integer >= 0"),
    ("score_function", "relu", "must be one of"),
    ("normalize_top_k", 1, "must be True or False"),
    ("routed_scaling_factor", 0.0, "must be a number > 0"),
    ("capacity_factor", -1.0, "must be a number >= 0"),
    ("impl", "gmm", "must be one of"),
    ("bias_update_rate", -0.1, "must be a number >= 0"),
])
def test_bad_spec_values_are_one_clear_error(field, value, problem):
  check_moe_spec(GOOD)
  with pytest.raises(ValueError, match=f"^config.model.moe.{field}={value!r}: {problem}"):
    check_moe_spec(dataclasses.replace(GOOD, **{field: value}), prefix="config.model.moe.")


def test_experts_must_divide_over_the_expert_axis():
  check_moe_spec(GOOD, expert_parallelism=4)
  with pytest.raises(ValueError, match=r"^MoESpec.num_experts=8: must be divisible by the expert mesh axis \(3"):
    check_moe_spec(GOOD, expert_parallelism=3)
