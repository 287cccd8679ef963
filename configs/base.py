"""Shared defaults for every attnres_jax run; named configs override fields of it."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (a small byte-level model)."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = 256  # tokens; 256 for the byte-level corpus
  model.num_layers = 4  # transformer layers L_b; AttnRes sublayers L = 2 * L_b
  model.d_model = 128  # residual width d
  model.num_heads = 4  # query heads; must divide d_model
  model.num_kv_heads = 4  # key/value heads; must divide num_heads (< num_heads: GQA)
  model.d_ff = 384  # SwiGLU hidden width
  model.rope_theta = 10_000.0  # RoPE base frequency
  model.tie_embeddings = False  # LM head shares the token-embedding matrix
  model.residual = "block"  # depth mixing: prenorm | full | block
  model.block_size = 2  # Block AttnRes block size S, in sublayers, 1 <= S <= 2 * num_layers
  model.key_norm_gain = True  # learnable gain in each key RMSNorm (spec section 2)
  model.norm_eps = 1e-6  # epsilon of every RMSNorm, key norms included
  model.init_std = 0.02  # std of weight init; output projections get init_std / sqrt(2 * num_layers)
  model.embed_init_std = 1.0  # std of the token-embedding init (source b_0 of AttnRes)
  model.dtype = "float32"  # activation dtype: float32 | bfloat16 (depth softmax always >= float32)
  model.param_dtype = "float32"  # parameter storage dtype: float32 | bfloat16
  model.remat = "full"  # activation rematerialisation: none | full | save_dots
  return config
