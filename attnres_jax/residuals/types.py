"""Types shared by the depth loops."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

# f_l(layer_inputs, consts, h_BxTxD) -> (out_BxTxD, aux): one sublayer with its own pre-norm
# (docs/method.md §1). `layer_inputs` is one layer's slice of the stacked parameters (and of
# the KV cache when decoding); `consts` are shared inputs such as RoPE tables; `aux` is a
# side output without gradient (the new keys and values when decoding, else None).
SublayerFn = Callable[[PyTree, PyTree, Array], tuple[Array, PyTree]]


def rms(x: Array) -> Array:
  """Root mean square over all elements, in float32 (for the analysis statistics)."""
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def stack_sublayers(per_sublayer: tuple[Array, ...]) -> Array:
  """K scanned statistics `[num_layers, ...]` (one per sublayer kind) -> `[L, ...]` in sublayer order."""
  return jnp.stack(per_sublayer, axis=1).reshape((-1,) + per_sublayer[0].shape[1:])
