"""Depth attention in plain jnp: the math of docs/method.md §2 and the reference of the Pallas kernel.

docs/method.md §2 (key RMSNorm, logits, softmax, weighted sum) and the
log-sum-exp merge of docs/method.md §6. Everything runs in float32 (float64 for float64
inputs) whatever the source dtype (convention, docs/method.md §12.1), at full precision
(`Precision.HIGHEST`: no TF32 on GPUs, which was measured to move the log-sum-exp
by 3e-4 on an H100; bf16 sources are multiplied and summed in float32 instead,
`_contract`): logits
`s_i = (v_i . (w * g)) / rms(v_i)`, no 1/sqrt(d) scale, softmax over the source
axis only. The key norm is kept as one inverse-RMS scalar per source and token,
so keys are never materialised: `RMSNorm(v) . w = (v . (w * g)) * inv_rms(v)`.

`depth_attention_reference` is the batched op of docs/method.md §6, phase 1: `Q`
pseudo-queries answered against the same `S` sources at once. It returns each
query's normalised mixture and the log-sum-exp of its logits, so that a later
source (the partial sum of phase 2) can be merged exactly. Its contract, shared
with `depth_attention_pallas.py`:
- `sources_SxMxD`: `S` sources of `M` tokens; sources `s >= num_valid` are masked
  (`num_valid` may be traced; 0 masks everything: zero mixture, lse = -inf).
- `query_gains_QxD`: pseudo-queries with the key-norm gain folded in, `w * g`.
- returns mixtures `[Q, M, d]` in the sources' dtype and lse `[Q, M]` in
  `compute_dtype` (float32, or float64 for float64 sources).
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


def _contract(subscripts: str, x: Array, y: Array, *, dtype, fused: bool, axis: int) -> Array:
  """`einsum(subscripts, x, y)` in `dtype` at full precision; with `fused`, as `sum(x * y, axis)`.

  For sources narrower than float32 (bf16) the multiply-and-sum is what XLA
  fuses into one pass over the buffer: as a float32 dot it converts and copies
  the whole `[S, M, d]` buffer to float32 at every call (paper-436M Block on a
  v5p chip: 19.5 -> 13.7 GiB of temp memory, docs/method.md §13). Float32
  sources keep the dot, which is faster on CPUs.
  """
  if fused:
    return jnp.sum(x.astype(dtype) * y.astype(dtype), axis=axis)
  return jnp.einsum(subscripts, x, y, preferred_element_type=dtype, precision=jax.lax.Precision.HIGHEST)


def attend(
    sources_SxMxD: Array,
    inv_rms_SxM: Array,
    query_gain_D: Array,
    mask_SxM: Array | None = None,
) -> tuple[Array, Array, Array]:
  """Depth attention of one (gain-folded) query over `S` sources.

  `M` stands for any number of token axes. Returns the normalised mixture
  `[M, d]`, the log-sum-exp of the logits `[M]` (phase-1 statistics of
  docs/method.md §6, enough to merge more sources exactly later) and the softmax
  weights `[S, M]`, all in `compute_dtype`. Masked sources get weight 0; a
  token with every source masked gets a zero mixture and lse = -inf, which
  `merge_source` turns into the merged source alone (gradients stay finite).
  """
  dtype = compute_dtype(sources_SxMxD.dtype)
  query_gain_D = query_gain_D.astype(dtype)
  fused = sources_SxMxD.dtype != dtype  # narrower sources: no float32 copy of the buffer (`_contract`)
  logits_SxM = _contract("s...d,d->s...", sources_SxMxD, query_gain_D, dtype=dtype, fused=fused,
                         axis=-1) * inv_rms_SxM
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
  mixture_MxD = _contract("s...,s...d->...d", weights_SxM[..., None] if fused else weights_SxM, sources_SxMxD,
                         dtype=dtype, fused=fused, axis=0)
  return mixture_MxD, lse_M, weights_SxM


def merge_source(
    mixture_MxD: Array, lse_M: Array, source_MxD: Array, logit_M: Array
) -> tuple[Array, Array]:
  """Adds one more source to a finished softmax by its log-sum-exp (docs/method.md §6).

  `exp(lse)` is the softmax denominator of the sources already mixed, so the new
  source's weight is `e^s / (e^lse + e^s) = sigmoid(s - lse)`: the online-softmax
  merge without the running maximum. Returns the merged mixture and the new
  source's weight `[M]`.
  """
  weight_M = jax.nn.sigmoid(logit_M - lse_M)
  merged_MxD = mixture_MxD + weight_M[..., None] * (source_MxD.astype(mixture_MxD.dtype) - mixture_MxD)
  return merged_MxD, weight_M


def depth_attention_reference(
    sources_SxMxD: Array, num_valid: Array | int, query_gains_QxD: Array, eps: float
) -> tuple[Array, Array]:
  """Mixtures `[Q, M, d]` and log-sum-exp `[Q, M]` of every query over the valid sources."""
  valid_Sx1 = (jnp.arange(sources_SxMxD.shape[0]) < num_valid)[:, None]
  inv_rms_SxM = inverse_rms(sources_SxMxD, eps)
  attend_each = jax.vmap(lambda qg_D: attend(sources_SxMxD, inv_rms_SxM, qg_D, valid_Sx1)[:2])
  mixtures_QxMxD, lse_QxM = attend_each(query_gains_QxD)
  return mixtures_QxMxD.astype(sources_SxMxD.dtype), lse_QxM
