"""The AttnRes mixing rule as one public function (docs/method.md §2).

The math lives in `attnres_jax.kernels.depth_attention_reference`.
"""

import jax
import jax.numpy as jnp

from attnres_jax.kernels.depth_attention_reference import attend, compute_dtype, inverse_rms

Array = jax.Array


def depth_attention(
    sources: Array,
    query: Array,
    gain: Array | None = None,
    eps: float = 1e-6,
    mask: Array | None = None,
) -> Array:
  """AttnRes mixing rule: `sum_i softmax_i(w . RMSNorm(v_i)) v_i` (docs/method.md §2).

  Args:
    sources: `[num_sources, ..., d]` source values `v_i` (embedding, sublayer
      outputs or block sums).
    query: `[d]` pseudo-query `w`.
    gain: optional `[d]` gain of the key RMSNorm (None: weightless norm).
    eps: RMSNorm epsilon.
    mask: optional boolean array broadcastable to `sources.shape[:-1]`; False
      drops a source. Each position needs at least one source left.

  Returns:
    `[..., d]` mixture in the dtype of `sources`, computed in float32.
  """
  if sources.ndim < 2:
    raise ValueError(f"sources must be [num_sources, ..., d], got shape {sources.shape}")
  if query.shape != sources.shape[-1:]:
    raise ValueError(f"query shape {query.shape} does not match source width {sources.shape[-1]}")
  if gain is not None and gain.shape != query.shape:
    raise ValueError(f"gain shape {gain.shape} does not match query shape {query.shape}")
  query_gain = query.astype(compute_dtype(sources.dtype))
  if gain is not None:
    query_gain = query_gain * gain.astype(query_gain.dtype)
  if mask is not None:
    mask = jnp.broadcast_to(mask, sources.shape[:-1])
  mixture, _, _ = attend(sources, inverse_rms(sources, eps), query_gain, mask)
  return mixture.astype(sources.dtype)
