"""Batched depth attention with a choice of implementation (docs/method.md §2, §6).

`config.model.depth_attention_impl` picks one of:
- `xla`: the pure-jnp reference (`depth_attention_reference.py`), fused by XLA;
- `pallas`: the fused Pallas kernel for the platform being lowered for (Mosaic
  on TPU, Triton on CUDA GPUs; `depth_attention_pallas.py`);
- `pallas_interpret`: the TPU kernel run by the Pallas TPU interpreter (CPU).
"""


from attnres_jax.kernels.depth_attention_pallas import TPU_INTERPRET, depth_attention_pallas
from attnres_jax.kernels.depth_attention_reference import depth_attention_reference
from attnres_jax.kernels.depth_attention_reference import Array, compute_dtype

IMPLS = ("xla", "pallas", "pallas_interpret")


def fold_gains(queries_QxD: Array, gains_QxD: Array | None, source_dtype) -> Array:
  """`w * g`: the key-norm gain folded into each pseudo-query, in `compute_dtype` (docs/method.md §2)."""
  dtype = compute_dtype(source_dtype)
  return queries_QxD.astype(dtype) if gains_QxD is None else queries_QxD.astype(dtype) * gains_QxD.astype(dtype)


def batched_depth_attention(
    sources_SxMxD: Array,
    num_valid: Array | int,
    queries_QxD: Array,
    gains_QxD: Array | None,
    eps: float,
    impl: str = "xla",
) -> tuple[Array, Array]:
  """Each query's mixture over sources `0 .. num_valid - 1`, and its log-sum-exp.

  Returns mixtures `[Q, M, d]` in the sources' dtype and lse `[Q, M]` in
  float32 (float64 for float64 sources); a query with no valid source gets a
  zero mixture and lse = -inf. Differentiable in sources, queries and gains.
  """
  if impl not in IMPLS:
    raise ValueError(f"depth_attention_impl must be one of {IMPLS}, got {impl!r}")
  if sources_SxMxD.ndim != 3 or queries_QxD.ndim != 2 or queries_QxD.shape[1] != sources_SxMxD.shape[2]:
    raise ValueError(f"expected sources [S, M, d] and queries [Q, d], got {sources_SxMxD.shape} and "
                     f"{queries_QxD.shape}")
  if gains_QxD is not None and gains_QxD.shape != queries_QxD.shape:
    raise ValueError(f"gains shape {gains_QxD.shape} does not match queries shape {queries_QxD.shape}")
  query_gains_QxD = fold_gains(queries_QxD, gains_QxD, sources_SxMxD.dtype)
  if impl == "xla":
    return depth_attention_reference(sources_SxMxD, num_valid, query_gains_QxD, eps)
  return depth_attention_pallas(sources_SxMxD, num_valid, query_gains_QxD, eps,
                                TPU_INTERPRET if impl == "pallas_interpret" else None)
