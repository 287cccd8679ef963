"""The Pallas depth-attention kernel against its jnp reference, forward and backward.

On CPU both kernel flavours run interpreted (the TPU kernel in the TPU
interpreter, the Triton kernel in the generic one); on a GPU the compiled
Triton kernel runs too. Lowering for real TPU and CUDA targets is checked from
any machine.
"""

import contextlib

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx

from attnres_jax import Transformer
from attnres_jax.kernels.depth_attention_op import batched_depth_attention
from attnres_jax.kernels.depth_attention_pallas import (TPU, TPU_INTERPRET, Target, depth_attention_pallas,
                                                        tpu_vmem_bytes)
from attnres_jax.kernels.depth_attention_reference import depth_attention_reference
from attnres_jax.train.loss import next_token_loss
from helpers import make_model, max_rel_error, random_tokens, tiny_config

# (S sources, num_valid, Q queries, M tokens, d width, dtype): tile-aligned and ragged
# token counts, widths that are not powers of two or lane multiples, masked sources.
SHAPES = [
    (1, 1, 1, 8, 64, "float32"),
    (1, 0, 1, 16, 64, "float32"),  # every source masked: zero mixture, lse = -inf
    (2, 2, 1, 37, 64, "float32"),
    (3, 2, 2, 130, 96, "float32"),
    (4, 4, 3, 64, 128, "bfloat16"),
    (5, 3, 4, 200, 160, "float32"),
    (5, 5, 8, 33, 192, "bfloat16"),
    (6, 6, 1, 257, 256, "float32"),
    (4, 3, 16, 24, 64, "float32"),
    (8, 8, 2, 128, 320, "bfloat16"),
    (9, 9, 8, 72, 256, "bfloat16"),
    (9, 5, 8, 96, 384, "float32"),
    (11, 11, 1, 300, 128, "float32"),
    (12, 7, 5, 40, 512, "bfloat16"),
    (16, 16, 4, 20, 64, "float32"),
    (17, 10, 1, 50, 640, "float32"),
    (24, 24, 2, 16, 96, "bfloat16"),
    (33, 33, 1, 24, 128, "float32"),
    (20, 13, 4, 16, 64, "float32"),
    (4, 4, 2, 16, 1024, "bfloat16"),
    (3, 3, 4, 20, 1024, "float32"),
]
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


def cases() -> list:
  """Every shape on the TPU interpreter (and the compiled GPU kernel); every third on the Triton one.

  Interpreted kernels unroll over sources x queries and run element by element:
  shapes with S * Q >= 32 or M * d >= 30000 are marked slow (run with `-m slow`).
  """
  kernels = [(TPU_INTERPRET, SHAPES), (Target("triton", interpret=True), SHAPES[::3])]
  if jax.default_backend() == "gpu":
    kernels.append((Target("triton"), SHAPES))
  slow = lambda target, shape: target.interpret and (shape[0] * shape[2] >= 32 or shape[3] * shape[4] >= 30000)
  return [pytest.param((target, shape), marks=[pytest.mark.slow] if slow(target, shape) else [])
          for target, shapes in kernels for shape in shapes]


def case_id(case) -> str:
  target, shape = case
  return target.backend + ("-interpret" if target.interpret else "") + "-S{}v{}Q{}M{}d{}-{}".format(*shape)


def random_inputs(num_sources, num_queries, tokens, width, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  scales = jnp.exp(jax.random.normal(keys[0], (num_sources, 1, 1)))  # sources of very different size
  sources = (scales * jax.random.normal(keys[1], (num_sources, tokens, width))).astype(dtype)
  queries = 0.3 * jax.random.normal(keys[2], (num_queries, width))
  gains = 1.0 + 0.3 * jax.random.normal(keys[3], (num_queries, width))
  d_keys = jax.random.split(keys[4])
  d_mixtures = jax.random.normal(d_keys[0], (num_queries, tokens, width)).astype(dtype)
  d_lse = jax.random.normal(d_keys[1], (num_queries, tokens))
  return sources, queries, gains, d_mixtures, d_lse


def outputs_and_grads(op, sources, num_valid, queries, gains, d_mixtures, d_lse):
  """The op's outputs and the VJP of (d_mixtures, d_lse) into sources, queries and gains."""
  outputs, vjp = jax.vjp(lambda s, q, g: op(s, num_valid, q, g), sources, queries, gains)
  return outputs, vjp((d_mixtures, d_lse))


def kernel_op(target):
  return lambda s, n, q, g: depth_attention_pallas(s, n, q * g, 1e-6, target)


def reference_op(s, n, q, g):
  return depth_attention_reference(s, n, q * g, 1e-6)


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_kernel_matches_reference(case):
  target, shape = case
  num_sources, num_valid, num_queries, tokens, width, dtype = shape
  inputs = random_inputs(num_sources, num_queries, tokens, width, dtype)
  sources, queries, gains, d_mixtures, d_lse = inputs
  (mixtures, lse), grads = jax.jit(outputs_and_grads, static_argnums=0)(
      kernel_op(target), sources, num_valid, queries, gains, d_mixtures, d_lse)
  (want_mixtures, want_lse), want_grads = outputs_and_grads(
      reference_op, sources, num_valid, queries, gains, d_mixtures, d_lse)
  assert mixtures.dtype == sources.dtype and lse.dtype == jnp.float32
  tolerance = TOLERANCE[dtype]
  if num_valid == 0:
    assert np.all(np.asarray(lse) == -np.inf) and not np.any(np.asarray(mixtures))
  else:
    assert max_rel_error(lse, want_lse) < tolerance
  assert max_rel_error(mixtures, want_mixtures) < tolerance
  for name, got, want in zip(("sources", "queries", "gains"), grads, want_grads):
    assert np.all(np.isfinite(np.asarray(got, np.float32))), name
    assert max_rel_error(got, want) < 4 * tolerance, name
  if num_valid < num_sources:  # masked sources get no gradient
    assert not np.any(np.asarray(grads[0][num_valid:]))


def test_check_grads_float64_in_the_interpreter():
  """The generic interpreter (the TPU one computes in float32 whatever the dtype)."""
  with jax.enable_x64(True):
    sources, queries, gains, _, _ = random_inputs(5, 3, 24, 64, "float64", seed=1)
    kernel = Target("triton", interpret=True)
    loss = lambda s, q, g: sum(jnp.sum(jnp.sin(x)) for x in depth_attention_pallas(s, 4, q * g, 1e-6, kernel))
    jax.test_util.check_grads(loss, (sources, queries, gains), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_traced_source_count_is_one_compilation():
  sources, queries, gains, _, _ = random_inputs(6, 2, 16, 64, "float32")
  op = jax.jit(lambda n: batched_depth_attention(sources, n, queries, gains, 1e-6, "pallas_interpret"))
  for num_valid in (1, 4, 6):
    np.testing.assert_allclose(op(num_valid)[0], reference_op(sources, num_valid, queries, gains)[0],
                               rtol=2e-5, atol=2e-5)
  assert op._cache_size() == 1


@pytest.mark.parametrize("bad", ["impl", "query_width", "gain_shape", "source_rank"])
def test_bad_input_is_a_clear_error(bad):
  sources, queries, gains, _, _ = random_inputs(3, 2, 16, 64, "float32")
  args = dict(sources_SxMxD=sources, num_valid=3, queries_QxD=queries, gains_QxD=gains, eps=1e-6, impl="xla")
  args.update({"impl": dict(impl="cuda"), "query_width": dict(queries_QxD=queries[:, :-1]),
               "gain_shape": dict(gains_QxD=gains[:1]), "source_rank": dict(sources_SxMxD=sources[0])}[bad])
  with pytest.raises(ValueError, match="impl|expected|gains shape"):
    batched_depth_attention(**args)


def lowering_context(platform: str):
  """On jax >= 0.12 a CUDA lowering without a GPU must be told which GPU it targets."""
  if platform != "cuda":
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def lower_for(platform: str, fn, *args) -> str:
  with lowering_context(platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernel_lowers_for_accelerators_at_paper_scale(platform, dtype):
  """Mosaic (TPU tiling rules) and Triton lower the forward and backward kernels: S=9, Q=8, M=16384, d=2048."""
  sources = jax.ShapeDtypeStruct((9, 16384, 2048), jnp.dtype(dtype))
  queries = jax.ShapeDtypeStruct((8, 2048), jnp.float32)

  def forward_backward(sources, queries):
    outputs, vjp = jax.vjp(lambda s, q: batched_depth_attention(s, 7, q, q, 1e-6, "pallas"), sources, queries)
    return outputs, vjp(outputs)

  text = lower_for(platform, forward_backward, sources, queries)
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(marker) == 2, "one forward and one backward kernel"


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_model_train_step_lowers_with_the_pallas_kernel(platform):
  config = tiny_config("block", depth_attention_impl="pallas", d_model=256, num_heads=4, num_kv_heads=4,
                       d_ff=512, dtype="bfloat16", num_layers=4, block_size=2)
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tokens = jax.ShapeDtypeStruct((4, 257), jnp.int32)
  step = jax.value_and_grad(lambda p, t: next_token_loss(nnx.merge(graphdef, p), t))
  text = lower_for(platform, step, params, tokens)
  assert ("tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton") in text


@pytest.mark.parametrize("residual,block_size", [("full", 1), ("block", 2),
                                                 pytest.param("block", 3, marks=pytest.mark.slow)])
def test_model_with_the_interpreted_kernel_equals_xla(residual, block_size):
  """Loss and every gradient of a train step: kernel (TPU interpreter) against the jnp reference."""
  tokens = random_tokens(length=9)
  results = []
  for impl in ("xla", "pallas_interpret"):
    graphdef, params = nnx.split(make_model(residual, block_size=block_size, depth_attention_impl=impl))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens)))(params)
    results.append((loss, grads))
  (want_loss, want_grads), (loss, grads) = results
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert max_rel_error(got, want) < 1e-4


@pytest.mark.parametrize("num_sources,num_queries,width,want_tile", [
    (9, 8, 1168, 128), (9, 1, 1168, 256), (9, 8, 2048, 64), (32, 1, 1168, 64)])
def test_tpu_token_tiles_fit_vmem(num_sources, num_queries, width, want_tile):
  """TPU token tiles at the paper's per-chip shapes (bf16, 65,536 tokens) are the largest whose blocks and
  float32 values fit the VMEM budget (`tests/test_aot_compile.py` compiles the first for a v5p chip)."""
  tile = TPU.token_tile(65536, num_sources, num_queries, width, 2)
  assert tile == want_tile
  assert tpu_vmem_bytes(tile, num_sources, num_queries, width, 2) <= 48 * 2**20 < tpu_vmem_bytes(
      2 * tile, num_sources, num_queries, width, 2)


def test_a_kernel_too_wide_for_vmem_is_one_clear_error():
  with pytest.raises(ValueError, match="depth_attention_impl=xla"):
    TPU.token_tile(65536, 256, 8, 8192, 2)

