"""The fixed-size KV cache of autoregressive decoding: a ring buffer over the last `window` positions.

What AttnRes caches (docs/method.md §11): nothing beyond the keys
and values of self-attention. A depth source `v_i` of a token is a function of
that token's own earlier sources and of the attention over earlier tokens'
keys and values; depth attention never looks at another position. So the new
token's sources (embedding, block sums, partial sum) are computed as it flows
through the layers and dropped after its logits, O(N d) per token in flight,
exactly as in PreNorm, whose residual stream is not cached either.

Keys are stored already rotated by their absolute position (RoPE), in slot
`position % window`, and a query at position `p` attends to the slots holding
positions `(p - window, p]`. While at most `window` positions have been seen,
nothing is evicted and decoding equals the full causal forward. Past that, the
ring evicts the oldest keys of every layer: decoding equals a full forward with
banded (sliding-window) causal attention of width `window` (tests/test_decode.py).
It is not a full forward over the last `window` tokens alone: with more than
one layer, the cached keys and values of deeper layers were computed from hidden
states that attended to tokens before the window, so their information still
flows in. A model trained with full causal attention never saw such a band
(docs/method.md §11).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class KVCache(NamedTuple):
  """Keys and values of every layer for the last `window` positions."""

  key_LxBxWxKxH: Array
  value_LxBxWxKxH: Array
  positions_W: Array  # int32: the absolute position held by each slot, -1 while empty
  length: Array  # int32 scalar: positions seen so far (the next token's position)

  @property
  def window(self) -> int:
    return self.positions_W.shape[0]


def empty_cache(num_layers: int, batch: int, window: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
  shape = (num_layers, batch, window, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((window,), -1, jnp.int32),
                 jnp.zeros((), jnp.int32))


class CacheWrite(NamedTuple):
  """Where `T` new tokens go and what each may attend to, shared by all layers."""

  slots_T: Array  # ring slot of each new token
  mask_TxW: Array  # bool: new token t may attend to slot w (after the write)


def plan_write(cache: KVCache, num_new: int) -> tuple[Array, CacheWrite, Array]:
  """Positions `[T]` of `num_new` tokens appended to `cache`, their slots and mask, and the new slot positions.

  A query sees the slots holding positions in `(p - window, p]`. Valid for one
  token at a time, or for up to `window` tokens on an empty cache (prefill):
  a longer chunk would overwrite slots its own first tokens still need.
  """
  positions_T = cache.length + jnp.arange(num_new, dtype=jnp.int32)
  slots_T = positions_T % cache.window
  positions_W = cache.positions_W.at[slots_T].set(positions_T)
  query_T1 = positions_T[:, None]
  mask_TxW = (positions_W >= 0) & (positions_W <= query_T1) & (positions_W > query_T1 - cache.window)
  return positions_T, CacheWrite(slots_T, mask_TxW), positions_W


def write(cache: KVCache, plan: CacheWrite, positions_W: Array, keys_LxBxTxKxH: Array,
          values_LxBxTxKxH: Array) -> KVCache:
  """The cache with the new tokens' keys and values in their slots (in place under donation)."""
  return KVCache(cache.key_LxBxWxKxH.at[:, :, plan.slots_T].set(keys_LxBxTxKxH.astype(cache.key_LxBxWxKxH.dtype)),
                 cache.value_LxBxWxKxH.at[:, :, plan.slots_T].set(
                     values_LxBxTxKxH.astype(cache.value_LxBxWxKxH.dtype)),
                 positions_W, cache.length + plan.slots_T.shape[0])
