"""Types shared by the depth loops."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

# f_l(layer_params, consts, h_BxTxD) -> out_BxTxD: one sublayer with its own pre-norm
# (spec section 1). `layer_params` is one layer's slice of the stacked parameters;
# `consts` are shared float inputs such as RoPE tables.
SublayerFn = Callable[[PyTree, PyTree, Array], Array]


def rms(x: Array) -> Array:
  """Root mean square over all elements, in float32 (for the analysis statistics)."""
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def stack_sublayers(per_sublayer: tuple[Array, ...]) -> Array:
  """K scanned statistics `[num_layers, ...]` (one per sublayer kind) -> `[L, ...]` in sublayer order."""
  return jnp.stack(per_sublayer, axis=1).reshape((-1,) + per_sublayer[0].shape[1:])
