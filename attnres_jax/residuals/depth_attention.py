"""Softmax attention over depth: one pseudo-query against a set of sources.

Implements `attnres-spec.md` section 2 (key RMSNorm, logits, softmax, weighted sum)
and the log-sum-exp merge of section 6. Everything runs in float32 (float64 for
float64 inputs) whatever the source dtype (convention, section 2): logits `s_i = (v_i . (w * g)) / rms(v_i)`,
no 1/sqrt(d) scale, softmax over the source axis only.

The key norm is kept as one inverse-RMS scalar per source and token, so keys are
never materialised: `RMSNorm(v) . w = (v . (w * g)) * inv_rms(v)`.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or wider if the inputs are wider: the precision of all depth mixing."""
  return jnp.promote_types(dtype, jnp.float32)


def inverse_rms(x_MxD: Array, eps: float) -> Array:
  """1 / sqrt(mean(x^2) + eps) over the last axis, in `compute_dtype`."""
  x32 = x_MxD.astype(compute_dtype(x_MxD.dtype))
  return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1) + eps)


def attend(
    sources_SxMxD: Array,
    inv_rms_SxM: Array,
    query_gain_D: Array,
    mask_SxM: Array | None = None,
) -> tuple[Array, Array, Array]:
  """Depth attention of one (gain-folded) query over `S` sources.

  `M` stands for any number of token axes. Returns the normalised mixture
  `[M, d]`, the log-sum-exp of the logits `[M]` (phase-1 statistics of spec
  section 6, enough to merge more sources exactly later) and the softmax
  weights `[S, M]`, all in `compute_dtype`. Masked sources get weight 0; a
  token with every source masked gets a zero mixture and lse = -inf, which
  `merge_source` turns into the merged source alone (gradients stay finite).
  """
  dtype = compute_dtype(sources_SxMxD.dtype)
  query_gain_D = query_gain_D.astype(dtype)
  logits_SxM = jnp.einsum(
      "s...d,d->s...", sources_SxMxD, query_gain_D, preferred_element_type=dtype
  ) * inv_rms_SxM
  if mask_SxM is not None:
    logits_SxM = jnp.where(mask_SxM, logits_SxM, -jnp.inf)
  max_M = jax.lax.stop_gradient(jnp.max(logits_SxM, axis=0))
  max_M = jnp.where(jnp.isfinite(max_M), max_M, 0.0)
  exp_SxM = jnp.exp(logits_SxM - max_M)
  denominator_M = jnp.sum(exp_SxM, axis=0)
  any_source_M = denominator_M > 0
  safe_denominator_M = jnp.where(any_source_M, denominator_M, 1.0)
  lse_M = jnp.where(any_source_M, jnp.log(safe_denominator_M) + max_M, -jnp.inf)
  weights_SxM = exp_SxM / safe_denominator_M
  mixture_MxD = jnp.einsum(
      "s...,s...d->...d", weights_SxM, sources_SxMxD, preferred_element_type=dtype
  )
  return mixture_MxD, lse_M, weights_SxM


def merge_source(
    mixture_MxD: Array, lse_M: Array, source_MxD: Array, logit_M: Array
) -> tuple[Array, Array]:
  """Adds one more source to a finished softmax by its log-sum-exp (spec section 6).

  `exp(lse)` is the softmax denominator of the sources already mixed, so the new
  source's weight is `e^s / (e^lse + e^s) = sigmoid(s - lse)`: the online-softmax
  merge without the running maximum. Returns the merged mixture and the new
  source's weight `[M]`.
  """
  weight_M = jax.nn.sigmoid(logit_M - lse_M)
  merged_MxD = mixture_MxD + weight_M[..., None] * (source_MxD.astype(mixture_MxD.dtype) - mixture_MxD)
  return merged_MxD, weight_M


def depth_attention(
    sources: Array,
    query: Array,
    gain: Array | None = None,
    eps: float = 1e-6,
    mask: Array | None = None,
) -> Array:
  """AttnRes mixing rule: `sum_i softmax_i(w . RMSNorm(v_i)) v_i` (spec section 2).

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
