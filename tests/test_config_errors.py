"""Each invalid model config fails at construction with one ValueError naming the field."""

import jax.numpy as jnp
import pytest
from flax import nnx

from attnres_jax import Transformer
from helpers import tiny_config

CASES = [
    (dict(residual="dense"), "residual"),
    (dict(residual="block", block_size=0), "block_size"),
    (dict(residual="block", block_size=7), "block_size"),  # 3 layers = 6 sublayers
    (dict(d_model=30), "d_model"),  # not divisible by 4 heads
    (dict(d_model=12, num_heads=4, num_kv_heads=1), "d_model"),  # odd head dim: no RoPE
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),  # odd: no RoPE
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(remat="everything"), "remat"),
    (dict(depth_attention_impl="cuda"), "depth_attention_impl"),
    (dict(residual="prenorm", two_phase=True), "two_phase"),
    (dict(depth_normalization="relu"), "depth_normalization"),
    (dict(depth_heads=3), "depth_heads"),  # does not divide d_model=32
    (dict(residual="block", depth_window=2), "depth_window"),
    (dict(depth_key_norm=False, two_phase=True), "two_phase"),
    (dict(depth_heads=2, depth_attention_impl="pallas"), "depth_attention_impl"),
    (dict(depth_logits="random"), "depth_logits"),
    (dict(depth_normalization="none"), "depth_normalization"),  # raw weights need learned logits
    (dict(depth_logits="learned", depth_heads=2), "depth_heads"),
    (dict(depth_logits="learned", depth_query_projection=True), "depth_query_projection"),
    (dict(depth_query_projection=True, two_phase=True), "two_phase"),
    (dict(depth_query_norm=True), "depth_query_norm"),  # normalises the input of a projection that is off
    (dict(residual="mhc", two_phase=True), "two_phase"),
    (dict(residual="prenorm", depth_query_projection=True), "depth_query_projection"),
    (dict(residual="mhc", depth_attention_impl="pallas"), "depth_attention_impl"),
    (dict(residual="mhc", mhc_streams=1), "mhc_streams"),
    (dict(residual="mhc", mhc_streams=6, mhc_residual_mixing="permutations"), "mhc_streams"),
    (dict(residual="mhc", mhc_residual_mixing="softmax"), "mhc_residual_mixing"),
    (dict(residual="mhc", mhc_sinkhorn_iters=0), "mhc_sinkhorn_iters"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(init_std=-1.0), "init_std"),
]


@pytest.mark.parametrize("overrides,field", CASES, ids=[field for _, field in CASES])
def test_invalid_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"config\.model\.{field}="):
    Transformer(tiny_config(**overrides), rngs=nnx.Rngs(0))


def test_head_dim_decouples_heads_from_the_width():
  model = Transformer(tiny_config(d_model=30, num_heads=4, num_kv_heads=2, head_dim=16), rngs=nnx.Rngs(0))
  assert model.layers.attention.query.shape == (3, 30, 4, 16)
  assert model(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 64)


def test_block_size_is_ignored_unless_block():
  Transformer(tiny_config("full", block_size=0), rngs=nnx.Rngs(0))
