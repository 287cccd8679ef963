"""Document masking (docs/method.md §14): with segment ids no token attends across an end-of-document token, so
a document inside a training window computes what it computes alone, for every residual and attention kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from attnres_jax.config_checks import check_run_config
from attnres_jax.sharding import MESH_AXES, activate, logical_to_spec
from attnres_jax.train.dynamics import make_dynamics_step
from attnres_jax.train.loss import document_segment_ids, next_token_loss
from attnres_jax.train.steps import init_train_state, make_eval_step, make_train_step
from configs import smoke
from helpers import VOCAB, make_model, max_rel_error, random_tokens
from test_attention_kernels import RULES, TOL, assert_close, loss_and_grads, qkv

EOD = 0
INIT_STD = 0.2  # sharper token attention than the default 0.02, so that what crosses documents shows


def case(residual, *, slow=False, **overrides):
  """A (residual, model overrides) parameter named after both."""
  name = "-".join([residual] + [f"{field}={value}" for field, value in overrides.items()])
  return pytest.param(residual, overrides, id=name, marks=[pytest.mark.slow] if slow else [])


RESIDUALS = [case("prenorm"), case("full"), case("block"), case("block", two_phase=True), case("mhc")]
# The custom-VJP depth loop under every remat policy, two-phase and segmented scans, and the stream loops; the
# slow cases (about 8 s each) repeat a code path of another.
GRADIENT_CASES = [case("full"), case("block"), case("block", remat="none"), case("block", two_phase=True, remat="none"),
                  case("mhc"), case("prenorm", slow=True), case("block", slow=True, remat="save_dots"),
                  case("block", slow=True, depth_scan_segments=2)]


def documents(*lengths, seed=0):
  """Rows `[1, n]` of random tokens without EOD, one per length."""
  keys = jax.random.split(jax.random.key(seed), len(lengths))
  return [jax.random.randint(key, (1, n), 1, VOCAB) for key, n in zip(keys, lengths)]


def joined(*parts):
  """Token rows and EOD tokens (`EOD` stands for one) concatenated along the sequence."""
  return jnp.concatenate([jnp.full((1, 1), EOD) if part is EOD else part for part in parts], axis=1)


@nnx.jit
def logits(model, tokens_BxT, segment_ids_BxT):
  return model(tokens_BxT, segment_ids_BxT=segment_ids_BxT)


@pytest.mark.parametrize("residual,overrides", RESIDUALS)
def test_a_document_in_a_window_computes_what_it_computes_alone(residual, overrides):
  """Rows [A, EOD, B], [A', EOD, B], [C, EOD, D, EOD, E]: with masking, the logits from each EOD to the next
  equal those of [EOD, doc] alone (RoPE is relative), whatever came before; without masking doc A reaches B."""
  model = make_model(residual, init_std=INIT_STD, **overrides)
  a, other_a, b, c, d, e = documents(5, 5, 6, 2, 4, 4)
  windows_BxT = jnp.concatenate([joined(a, EOD, b), joined(other_a, EOD, b), joined(c, EOD, d, EOD, e)])
  masked = logits(model, windows_BxT, document_segment_ids(windows_BxT, EOD))
  alone_b = logits(model, joined(EOD, b), None)[0]
  alone_d, alone_e = logits(model, jnp.concatenate([joined(EOD, d), joined(EOD, e)]), None)
  for got, want in ((masked[0, 5:], alone_b), (masked[1, 5:], alone_b), (masked[2, 2:7], alone_d),
                    (masked[2, 7:], alone_e)):
    assert max_rel_error(got, want) < 1e-4, max_rel_error(got, want)  # measured <= 1.7e-5 (float32 rounding)
  unmasked = logits(model, windows_BxT, None)
  assert max_rel_error(unmasked[0, 5:], unmasked[1, 5:]) > 0.1  # measured >= 0.58


@pytest.mark.parametrize("residual,overrides", GRADIENT_CASES)
def test_window_gradients_are_the_documents_gradients_weighted_by_their_predictions(residual, overrides):
  """tokens [a_0 .. a_{m-1}, EOD, b_0 .. b_{n-1}] make T = m + n predictions: m of them predict doc A and its
  EOD from doc A, n predict doc B from the EOD on. So the window's mean loss, and its gradients, are
  (m L_A + n L_B) / T, with L_A the loss of [doc A, EOD] alone and L_B that of [EOD, doc B]."""
  model = make_model(residual, init_std=INIT_STD, **overrides)
  (a, b), m, n = documents(3, 6), 3, 6
  value_and_grad = nnx.jit(nnx.value_and_grad(lambda model, tokens_BxT1: next_token_loss(model, tokens_BxT1,
                                                                                         eod_id=EOD)))
  loss, grads = value_and_grad(model, joined(a, EOD, b))
  (loss_a, grads_a), (loss_b, grads_b) = value_and_grad(model, joined(a, EOD)), value_and_grad(model, joined(EOD, b))
  np.testing.assert_allclose(loss, (m * loss_a + n * loss_b) / (m + n), rtol=1e-6)
  flat_a, flat_b = dict(nnx.to_flat_state(grads_a)), dict(nnx.to_flat_state(grads_b))
  for path, got in nnx.to_flat_state(grads):
    want = (m * flat_a[path][...] + n * flat_b[path][...]) / (m + n)
    # float32 rounding: measured <= 2.1e-5 of the largest entry (jax 0.12); without the mask about 5e-2
    np.testing.assert_allclose(got[...], want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))) + 1e-7,
                               err_msg=str(path))


def test_document_segment_ids_count_the_eod_tokens_up_to_each_position():
  """An EOD opens the segment of the document after it (it is that document's first token)."""
  tokens_BxT = jnp.array([[3, EOD, 5, EOD, EOD, 7], [EOD, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]])
  segment_ids_BxT = document_segment_ids(tokens_BxT, EOD)
  assert segment_ids_BxT.dtype == jnp.int32
  np.testing.assert_array_equal(segment_ids_BxT, [[0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(document_segment_ids(tokens_BxT, 5), [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1],
                                                                      [0, 0, 0, 0, 1, 1]])


def random_segment_ids(batch, seq_len):
  """About 8 documents per row of 128, at different places in every row."""
  return document_segment_ids(jax.random.randint(jax.random.key(3), (batch, seq_len), 0, 16), EOD)


def test_splash_with_segment_ids_equals_xla_with_the_mask():
  """Outputs and gradients; and the segment ids change them (the mask is not a no-op)."""
  args = qkv(batch=2, seq_len=128, heads=2, kv_heads=1, head_dim=16)
  segment_ids_BxT = random_segment_ids(2, 128)
  (_, out), grads = loss_and_grads("splash_interpret")(*args, segment_ids_BxT)
  (_, want_out), want_grads = loss_and_grads("xla")(*args, segment_ids_BxT)
  assert_close((out, grads), (want_out, want_grads), TOL[jnp.float32])
  (_, causal_out), _ = loss_and_grads("xla")(*args)
  assert max_rel_error(out, causal_out) > 0.1


def test_sharded_splash_with_batch_sharded_segment_ids_equals_xla():
  """On a (2, 2, 2) mesh each device runs the kernel on its 2 of 8 rows and their segment ids."""
  mesh = jax.make_mesh((2, 2, 1, 2), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  args = qkv(batch=8, seq_len=128, heads=2, kv_heads=2, head_dim=16) + [random_segment_ids(8, 128)]
  names = [("batch", "activation_length", "activation_heads", None)] * 3 + [("batch", "activation_length")]
  args = [jax.device_put(x, NamedSharding(mesh, logical_to_spec(n, x.shape, RULES, dict(mesh.shape))))
          for x, n in zip(args, names)]
  with activate(mesh, RULES):
    traced = loss_and_grads("splash_interpret").trace(*args)
  got = traced.lower().compile()(*args)
  shard_maps = [eqn for eqn in traced.jaxpr.jaxpr.eqns if eqn.primitive.name == "shard_map"]  # forward, backward
  assert len(shard_maps) == 2
  for eqn in shard_maps:
    assert "int32[2,128]" in [v.aval.str_short() for v in eqn.params["jaxpr"].invars]  # this device's rows' ids
  assert_close(got, loss_and_grads("xla")(*[np.asarray(x) for x in args]), TOL[jnp.float32])


def test_transformer_with_splash_and_segment_ids_equals_xla():
  tokens_BxT = random_tokens(2, 128)
  segment_ids_BxT = random_segment_ids(2, 128)
  got, want = (logits(make_model("prenorm", attention_impl=impl, num_layers=1), tokens_BxT, segment_ids_BxT)
               for impl in ("splash_interpret", "xla"))
  assert_close(got, want, TOL[jnp.float32])


def test_train_eval_and_dynamics_steps_pass_the_eod_id_on():
  model = make_model("block", init_std=INIT_STD)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens_BxT1 = random_tokens(2, 13).at[:, 5].set(EOD)
  want, unmasked = next_token_loss(model, tokens_BxT1, eod_id=EOD), next_token_loss(model, tokens_BxT1)
  assert abs(float(want - unmasked)) > 0.01  # measured 0.41
  eval_loss = make_eval_step(graphdef, eod_id=EOD)(params, tokens_BxT1)
  dynamics = make_dynamics_step(graphdef, 1, eod_id=EOD)(params, tokens_BxT1)
  tx = optax.sgd(0.1)
  _, metrics = make_train_step(graphdef, tx, 1, eod_id=EOD)(init_train_state(params, tx, 0), tokens_BxT1)  # donates
  for loss in (eval_loss, dynamics["loss"], metrics["loss"]):
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_document_masking_must_be_a_bool():
  """Off by default and allowed with every attention_impl. A ConfigDict already refuses a non-bool; a plain
  mapping (a loaded config.json) is checked."""
  config = smoke.get_config()
  assert config.data.document_masking is False
  config.data.document_masking = True
  for impl, platform in (("xla", "cpu"), ("splash_interpret", "cpu"), ("splash", "tpu"), ("cudnn", "gpu")):
    config.model.attention_impl = impl
    check_run_config(config, platform=platform)
  config = config.to_dict()
  config["data"]["document_masking"] = "yes"
  with pytest.raises(ValueError, match=r"config\.data\.document_masking="):
    check_run_config(config, platform="gpu")  # the last attention_impl, cudnn's
