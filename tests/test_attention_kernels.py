"""Token attention by `attention_impl`: the splash kernel (interpreted here) equals XLA's, sharded and not;
`auto` picks by the platform compiled for; splash compiles ahead of time for TPU without T x T scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attnres_jax import Transformer, sample
from attnres_jax.model.attention_kernels import auto_impl, causal_attention
from attnres_jax.sharding import MESH_AXES, activate, logical_to_spec, param_shardings
from attnres_jax.train.loss import next_token_loss
from configs import base
from helpers import max_rel_error, random_tokens, tiny_config

RULES = base.get_config().mesh.rules
# Relative to the largest entry. Measured, splash vs xla: up to 1.6e-6 in float32, 6e-3 in bfloat16 (xla's own
# bfloat16 error against float32 is 5e-3). A missing 1/sqrt(H) or a wrong head mapping is off by O(1).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def qkv(batch=2, seq_len=256, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  shapes = [(batch, seq_len, heads, head_dim)] + [(batch, seq_len, kv_heads, head_dim)] * 2
  return [jax.random.normal(key, shape).astype(dtype) for key, shape in zip(keys, shapes)]


def loss_and_grads(impl):
  """A fixed random-looking weighting of the attention output (each entry its own cotangent), the output, and
  the gradients in (q, k, v); segment ids may follow them."""
  def loss(q, k, v, segment_ids_BxT=None):
    o = causal_attention(q, k, v, impl=impl, segment_ids_BxT=segment_ids_BxT)
    return jnp.sum(o.astype(jnp.float32) * jnp.cos(jnp.arange(o.size).reshape(o.shape))), o
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_close(got, want, tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    assert max_rel_error(a, b) < tol, max_rel_error(a, b)


@pytest.mark.parametrize("kv_heads, dtype", [(4, jnp.float32), (2, jnp.float32), (1, jnp.bfloat16)])
def test_splash_vs_xla_outputs_and_gradients(kv_heads, dtype):
  """Multi-head, grouped and multi-query KV heads; the output in q's dtype."""
  args = qkv(kv_heads=kv_heads, dtype=dtype)
  (_, out), grads = loss_and_grads("splash_interpret")(*args)
  (_, want_out), want_grads = loss_and_grads("xla")(*args)
  assert out.dtype == dtype
  assert_close((out, grads), (want_out, want_grads), TOL[dtype])


def pallas_calls(jaxpr) -> list:
  """Every `pallas_call` equation in a jaxpr and the jaxprs nested in it (scan, shard_map, custom_vjp ...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (Jaxpr, ClosedJaxpr)):
          found += pallas_calls(getattr(sub, "jaxpr", sub))
  return found


def test_transformer_with_splash_vs_xla():
  """The flag reaches the layers: the splash model runs the kernel and its logits equal XLA's."""
  tokens_BxT, logits, calls = random_tokens(2, 128), {}, {}
  for impl in ("splash_interpret", "xla"):
    graphdef, state = nnx.split(Transformer(tiny_config("prenorm", attention_impl=impl, num_layers=2),
                                            rngs=nnx.Rngs(0)))
    traced = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).trace(state, tokens_BxT)
    calls[impl] = pallas_calls(traced.jaxpr.jaxpr)
    logits[impl] = traced.lower().compile()(state, tokens_BxT)
  assert calls["splash_interpret"] and not calls["xla"]
  assert_close(logits["splash_interpret"], logits["xla"], TOL[jnp.float32])


@pytest.mark.parametrize("kv_heads, local_heads", [(2, (2, 1)), (1, (4, 1))])
def test_sharded_splash_vs_xla(kv_heads, local_heads):
  """On a (2, 2, 2) mesh each device runs the kernel on its 2 of 8 rows and, where the tensor axis divides
  the KV heads too, on its half of the heads; outputs and gradients equal XLA's on one device."""
  mesh = jax.make_mesh((2, 2, 1, 2), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  args = qkv(batch=8, seq_len=128, kv_heads=kv_heads)
  names = ("batch", "activation_length", "activation_heads", None)
  args = [jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, x.shape, RULES, dict(mesh.shape))))
          for x in args]
  with activate(mesh, RULES):
    traced = loss_and_grads("splash_interpret").trace(*args)
  got = traced.lower().compile()(*args)
  forward = pallas_calls(traced.jaxpr.jaxpr)[0]
  kernel_inputs = [v.aval.shape for v in forward.invars if v.aval.ndim == 4]  # q, k, v [rows, heads, T, H]
  assert kernel_inputs == [(2, local_heads[0], 128, 16)] + [(2, local_heads[1], 128, 16)] * 2
  assert_close(got, loss_and_grads("xla")(*[np.asarray(x) for x in args]), TOL[jnp.float32])


def tpu_mesh(shape=(2, 1, 1, 2)) -> Mesh:
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def test_auto_picks_by_the_platform_compiled_for():
  assert auto_impl(256, jnp.float32) == "xla"  # this CPU host
  with activate(jax.make_mesh((8, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)), RULES):
    assert auto_impl(256, jnp.bfloat16) == "xla"
  with activate(tpu_mesh(), RULES):
    assert auto_impl(256, jnp.float32) == "splash"
    assert auto_impl(200, jnp.float32) == "xla"  # not whole splash tiles


def test_unusable_settings_are_errors():
  with pytest.raises(ValueError, match="multiple of 128"):
    causal_attention(*qkv(seq_len=200), impl="splash_interpret")
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    causal_attention(*qkv(), impl="flash")


def test_sampling_maps_accelerator_kernels_to_this_platform(monkeypatch):
  """A run trained with splash is sampled on CPU: `load_model` builds a model whose attention runs here."""
  class Restored:
    def __init__(self, *args, **kwargs):
      pass

    def restore_params(self, target):
      return 7, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), target)

    def close(self):
      pass

  monkeypatch.setattr(sample, "Checkpointer", Restored)
  config = base.get_config()
  config.model = tiny_config(attention_impl="splash")
  model, step = sample.load_model("unused", config)
  assert step == 7 and model(random_tokens(1, 128)).shape == (1, 128, config.model.vocab_size)


def test_splash_compiles_for_tpu_without_dense_scores():
  """Forward and backward of a T = 2048 model, compiled ahead of time for 4 v5e chips (batch over data, heads
  over tensor): XLA's temporaries hold the dense scores of a chip's rows and heads, splash's stay far below
  them. (Much smaller scores XLA keeps in VMEM, out of the temp count: measured 0 bytes at 16 MiB.)"""
  mesh, batch, seq_len, heads = tpu_mesh(), 4, 2048, 8
  scores_bytes = (batch // 2) * (heads // 2) * seq_len**2 * 4  # float32 [T, T] of a chip's rows and heads
  temp = {}
  for impl in ("splash", "xla"):
    config = tiny_config("prenorm", attention_impl=impl, num_layers=1, d_model=128, num_heads=heads,
                         num_kv_heads=heads, head_dim=128, d_ff=128, vocab_size=256)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = param_shardings(params, mesh, RULES)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32,
                                  sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))
    loss = lambda p, t: next_token_loss(nnx.merge(graphdef, p), t)
    with activate(mesh, RULES):
      compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["splash"] < scores_bytes / 4 < scores_bytes < temp["xla"], (temp, scores_bytes)
