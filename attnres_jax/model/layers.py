"""Transformer building blocks: RMSNorm, RoPE attention (GQA), SwiGLU MLP.

Every parameter is created with its logical axis names (`attnres_jax.axes`).
Weights are stored in `param_dtype` and cast to the activation dtype at use.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from attnres_jax import axes
from attnres_jax.kernels.depth_attention_reference import compute_dtype
from attnres_jax.model.attention_kernels import causal_attention
from attnres_jax.model.kv_cache import CacheWrite
from attnres_jax.sharding import constrain

Array = jax.Array
TOKEN_ACTIVATIONS = (axes.BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_EMBED)
HEAD_ACTIVATIONS = (axes.BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_HEADS, None)


def logical_param(value: Array, names: tuple[str | None, ...]) -> nnx.Param:
  """A parameter carrying logical axis names (sharding is applied later, not eagerly)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, names, dtype) -> nnx.Param:
  return logical_param(std * jax.random.normal(rngs.params(), shape, dtype), names)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32 (or wider)."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = logical_param(jnp.ones((dim,), param_dtype), (axes.EMBED,))
    self.eps = eps

  def __call__(self, x_BxTxD: Array) -> Array:
    x32 = x_BxTxD.astype(compute_dtype(x_BxTxD.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(x32.dtype)).astype(x_BxTxD.dtype)


def rope_tables(positions_T: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """(sin, cos) `[T, head_dim / 2]` of rotary position embeddings, float32."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_TxH = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.sin(angles_TxH), jnp.cos(angles_TxH)


def apply_rope(x_BxTxNxH: Array, rope: tuple[Array, Array]) -> Array:
  """Rotates channel pairs (i, i + H/2) by the position angle (rotate-half convention)."""
  sin_TxH, cos_TxH = (t[:, None, :] for t in rope)
  x1, x2 = jnp.split(x_BxTxNxH.astype(compute_dtype(x_BxTxNxH.dtype)), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_TxH - x2 * sin_TxH, x2 * cos_TxH + x1 * sin_TxH], axis=-1)
  return rotated.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE and optional grouped KV heads.

  `attention_impl` (`attention_kernels.IMPLS`) computes attention without a
  cache; with one it is always `jax.nn.dot_product_attention` under the mask.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *, init_std: float,
               out_std: float, dtype, param_dtype, rngs: nnx.Rngs, attention_impl: str = "xla"):
    self.query = normal_param(rngs, (d_model, num_heads, head_dim), init_std,
                              (axes.EMBED, axes.HEADS, axes.HEAD_DIM), param_dtype)
    self.key = normal_param(rngs, (d_model, num_kv_heads, head_dim), init_std,
                            (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), param_dtype)
    self.value = normal_param(rngs, (d_model, num_kv_heads, head_dim), init_std,
                              (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), param_dtype)
    self.out = normal_param(rngs, (num_heads, head_dim, d_model), out_std,
                            (axes.HEADS, axes.HEAD_DIM, axes.EMBED), param_dtype)
    self.dtype = dtype
    self.attention_impl = attention_impl

  def __call__(self, x_BxTxD: Array, rope: tuple[Array, Array], cache: tuple[Array, Array] | None = None,
               plan: CacheWrite | None = None, segment_ids_BxT: Array | None = None
               ) -> tuple[Array, tuple[Array, Array]]:
    """Output `[B, T, d]` and the new tokens' (rotated keys, values) `[B, T, K, H]`.

    Without a cache the `T` tokens attend causally to each other (with
    `segment_ids_BxT`, only within their segment: docs/method.md §14); with one
    (`cache` = this layer's keys and values `[B, W, K, H]`) they are written
    into their ring slots first and attend to the slots `plan.mask_TxW` allows.
    """
    w = lambda p: p[...].astype(self.dtype)
    project = lambda p: constrain(jnp.einsum("btd,dnh->btnh", x_BxTxD, w(p)), HEAD_ACTIVATIONS)
    q_BxTxNxH = apply_rope(project(self.query), rope)
    k_BxTxKxH = apply_rope(project(self.key), rope)
    v_BxTxKxH = project(self.value)
    if cache is None:
      o_BxTxNxH = causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, impl=self.attention_impl,
                                   segment_ids_BxT=segment_ids_BxT)
    else:
      keys_BxWxKxH, values_BxWxKxH = (c.at[:, plan.slots_T].set(new.astype(c.dtype))
                                      for c, new in zip(cache, (k_BxTxKxH, v_BxTxKxH)))
      o_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, keys_BxWxKxH.astype(self.dtype),
                                               values_BxWxKxH.astype(self.dtype), mask=plan.mask_TxW)
    out_BxTxD = constrain(jnp.einsum("btnh,nhd->btd", o_BxTxNxH, w(self.out)), TOKEN_ACTIVATIONS)
    return out_BxTxD, (k_BxTxKxH, v_BxTxKxH)


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up))."""

  def __init__(self, d_model: int, d_ff: int, *, init_std: float, out_std: float, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.gate = normal_param(rngs, (d_model, d_ff), init_std, (axes.EMBED, axes.MLP), param_dtype)
    self.up = normal_param(rngs, (d_model, d_ff), init_std, (axes.EMBED, axes.MLP), param_dtype)
    self.down = normal_param(rngs, (d_ff, d_model), out_std, (axes.MLP, axes.EMBED), param_dtype)
    self.dtype = dtype

  def __call__(self, x_BxTxD: Array) -> Array:
    w = lambda p: p[...].astype(self.dtype)
    hidden_BxTxF = jax.nn.silu(x_BxTxD @ w(self.gate)) * (x_BxTxD @ w(self.up))
    hidden_BxTxF = constrain(hidden_BxTxF, (axes.BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_MLP))
    return constrain(hidden_BxTxF @ w(self.down), TOKEN_ACTIVATIONS)
