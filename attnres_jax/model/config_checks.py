"""Validation of `config.model`: one clear ValueError naming the bad field."""

from collections.abc import Mapping
from typing import Any

from attnres_jax.residuals.remat import REMAT_POLICIES

RESIDUALS = ("prenorm", "full", "block")
DTYPES = ("float32", "bfloat16", "float64")  # float64 needs jax_enable_x64 (gradient checks)


def _fail(field: str, value: Any, requirement: str):
  raise ValueError(f"config.model.{field}={value!r}: {requirement}")


def check_model_config(model: Mapping[str, Any]) -> None:
  """Raises ValueError for the first invalid field of a model config."""
  for field in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff"):
    value = model[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(field, value, "must be a positive integer")
  if model["residual"] not in RESIDUALS:
    _fail("residual", model["residual"], f"must be one of {RESIDUALS}")
  num_sublayers = 2 * model["num_layers"]
  if model["residual"] == "block":
    block_size = model["block_size"]
    if not isinstance(block_size, int) or not 1 <= block_size <= num_sublayers:
      _fail("block_size", block_size,
            f"must be an integer in [1, {num_sublayers}] (sublayers = 2 * num_layers)")
  if model["d_model"] % model["num_heads"]:
    _fail("d_model", model["d_model"], f"must be divisible by num_heads={model['num_heads']}")
  if (model["d_model"] // model["num_heads"]) % 2:
    _fail("d_model", model["d_model"], "d_model / num_heads must be even for RoPE")
  if model["num_heads"] % model["num_kv_heads"]:
    _fail("num_kv_heads", model["num_kv_heads"],
          f"must divide num_heads={model['num_heads']}")
  for field in ("dtype", "param_dtype"):
    if model[field] not in DTYPES:
      _fail(field, model[field], f"must be one of {DTYPES}")
  if model["remat"] not in REMAT_POLICIES:
    _fail("remat", model["remat"], f"must be one of {REMAT_POLICIES}")
  for field in ("norm_eps", "init_std", "embed_init_std", "rope_theta"):
    if not model[field] > 0:
      _fail(field, model[field], "must be > 0")
