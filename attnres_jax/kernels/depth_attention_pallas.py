"""Fused Pallas kernel for batched depth attention (docs/method.md §2, §6).

Same contract as `depth_attention_reference.py`. One grid step owns a tile of
`TM` tokens and reads each of its `S` sources from memory once: key RMSNorm,
logits of all `Q` queries, masked softmax over sources and the `Q` weighted sums
are fused, and accumulate in `compute_dtype` (float32; float64 for float64
inputs). The backward kernel recomputes the softmax from the sources (no
probabilities are stored) and writes the source cotangents and per-tile
query-gain cotangents, summed over tiles outside the kernel.

Backward math, per token (`r_s` inverse RMS, `z_qs` logit, `a_qs` weight,
`o_q` mixture, `do_q` / `dlse_q` the incoming cotangents):
  dz_qs = a_qs (do_q . v_s - do_q . o_q + dlse_q),   do_q . o_q = sum_s a_qs (do_q . v_s)
  dv_s  = sum_q a_qs do_q + r_s sum_q dz_qs qg_q - (sum_q dz_qs z_qs) r_s^2 v_s / d
  dqg_q = sum_tokens sum_s dz_qs r_s v_s

Layout: per-token statistics are `[TM, Qp]` columns (tokens on sublanes,
queries on lanes), so no value is transposed inside a kernel; on TPU the logits
are a `[TM, d] x [d, Qp]` matmul. `lse` and its cotangent cross the kernel boundary
token-major (`[M, Qp]`) and are transposed outside (Q * 4 bytes per token).

Targets (`Target`): Mosaic TPU (token tiles of 16-512 sized to VMEM, every
block's last two dims 128/8-aligned or full, the source count in SMEM) and Triton on GPU
(power-of-two values: width and queries padded to powers of two, no
`tl.dot` (its operands would be staged in shared memory; lane sums instead),
token tiles of about 4096 elements that stay in registers). Inputs are zero-padded to whole
tiles outside the kernel; zero tokens have finite statistics and contribute
nothing to the query-gain cotangent.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from attnres_jax.kernels.depth_attention_reference import Array, compute_dtype

_LANES = 128
_TPU_VMEM_BUDGET = 48 * 2**20  # VMEM a TPU token tile may use: blocks and float32 values (`tpu_vmem_bytes`)
_TPU_VMEM_LIMIT = 60 * 2**20  # the compiler's scoped-VMEM limit for the kernels (v5p has 64 MiB)
_TPU_TILES = (512, 256, 128, 64, 32, 16)
_HIGHEST = jax.lax.Precision.HIGHEST


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def tpu_vmem_bytes(tile: int, num_sources: int, num_queries: int, width: int, itemsize: int) -> int:
  """VMEM of the backward kernel (the larger) at a token tile: its blocks (sources, their cotangents and the
  mixtures' cotangents, double-buffered) and the float32 values Mosaic keeps of them, about `2 S + 2 Q` per
  token and channel (fitted to compiles for v5p: d = 1168, S = 9, Q = 8 needs 68.5 MiB at 256 tokens)."""
  blocks = 2 * (2 * num_sources + num_queries) * tile * width * itemsize
  return blocks + (2 * num_sources + 2 * num_queries) * tile * width * 4


@dataclasses.dataclass(frozen=True)
class Target:
  """A Pallas backend and how the op is tiled for it; `interpret` runs it on CPU."""

  backend: str  # "tpu" (Mosaic) | "triton"
  interpret: bool = False
  triton_tile_elements: int = 4096  # elements of a [TM, d] tile a Triton program keeps in registers
  triton_num_warps: int = 4

  def padded_width(self, width: int) -> int:
    return pl.next_power_of_2(width) if self.backend == "triton" else width

  def padded_queries(self, num_queries: int) -> int:
    if self.backend == "triton":
      return pl.next_power_of_2(num_queries)
    return _round_up(num_queries, _LANES)

  def token_tile(self, num_tokens: int, num_sources: int, num_queries: int, width: int, itemsize: int) -> int:
    if self.backend == "triton":
      return min(max(1, self.triton_tile_elements // width), pl.next_power_of_2(num_tokens))
    for tile in _TPU_TILES:
      if (tile <= _round_up(num_tokens, _LANES)
          and tpu_vmem_bytes(tile, num_sources, num_queries, width, itemsize) <= _TPU_VMEM_BUDGET):
        return tile
    raise ValueError(f"depth attention over {num_sources} sources of width {width} for {num_queries} queries "
                     f"needs {tpu_vmem_bytes(_TPU_TILES[-1], num_sources, num_queries, width, itemsize) / 2**20:.0f}"
                     f" MiB of VMEM at {_TPU_TILES[-1]} tokens, over {_TPU_VMEM_BUDGET / 2**20:.0f} MiB: use "
                     "depth_attention_impl=xla")

  def count_spec(self) -> pl.BlockSpec:
    if self.backend == "tpu":
      return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((1,), lambda *_: (0,))

  def compiler_params(self, dimension_semantics: tuple[str, ...]):
    if self.backend == "tpu":
      return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=_TPU_VMEM_LIMIT)
    return pltriton.CompilerParams(num_warps=self.triton_num_warps, num_stages=1)

  def interpret_mode(self):
    if not self.interpret:
      return False
    return pltpu.InterpretParams() if self.backend == "tpu" else True


TPU = Target("tpu")
TRITON = Target("triton")
TPU_INTERPRET = Target("tpu", interpret=True)


def _query_dots(v_TxD, query_gains_ref, num_queries: int, use_matmul: bool):
  """`[TM, Qp]` dot products `v . qg_q`: one matmul (TPU), or per-query lane sums (Triton)."""
  if use_matmul:
    return jax.lax.dot_general(v_TxD, query_gains_ref[...].astype(v_TxD.dtype), (((1,), (1,)), ((), ())),
                               precision=_HIGHEST, preferred_element_type=v_TxD.dtype)
  lanes = jax.lax.broadcasted_iota(jnp.int32, (v_TxD.shape[0], query_gains_ref.shape[0]), 1)
  dots_TxQp = jnp.zeros(lanes.shape, v_TxD.dtype)
  for q in range(num_queries):
    dot_Tx1 = jnp.sum(v_TxD * query_gains_ref[q:q + 1, :].astype(v_TxD.dtype), axis=1, keepdims=True)
    dots_TxQp = jnp.where(lanes == q, dot_Tx1, dots_TxQp)
  return dots_TxQp


def _weighted_queries(d_logits_TxQp, query_gains_ref, num_queries: int, use_matmul: bool):
  """`[TM, d]` sums `sum_q dz_q qg_q`: one matmul (TPU), or per-query updates (Triton)."""
  dtype = d_logits_TxQp.dtype
  if use_matmul:
    return jax.lax.dot_general(d_logits_TxQp, query_gains_ref[...].astype(dtype), (((1,), (0,)), ((), ())),
                               precision=_HIGHEST, preferred_element_type=dtype)
  return functools.reduce(jnp.add, [_column(d_logits_TxQp, q) * query_gains_ref[q:q + 1, :].astype(dtype)
                                    for q in range(num_queries)])


def _column(x_TxQp: Array, q: int) -> Array:
  """Column `q` as `[TM, 1]`, by a masked lane sum (Triton lowers no value slicing)."""
  lanes = jax.lax.broadcasted_iota(jnp.int32, x_TxQp.shape, 1)
  return jnp.sum(jnp.where(lanes == q, x_TxQp, 0.0), axis=1, keepdims=True)


def _softmax(logits):
  """Softmax over the list of per-source logits; returns weights and (denominator, max)."""
  max_TxQp = functools.reduce(jnp.maximum, logits)
  max_TxQp = jnp.where(max_TxQp == -jnp.inf, 0.0, max_TxQp)
  exps = [jnp.exp(z - max_TxQp) for z in logits]
  denominator_TxQp = functools.reduce(jnp.add, exps)
  inv_denominator = jnp.where(denominator_TxQp > 0, 1.0 / jnp.where(denominator_TxQp > 0, denominator_TxQp, 1.0), 0.0)
  return [e * inv_denominator for e in exps], denominator_TxQp, max_TxQp


def _source(sources_ref, s: int, dtype) -> Array:
  """Source `s` of the tile, `[TM, d]` in the compute dtype (re-read, not kept live, between passes)."""
  return sources_ref[s].astype(dtype)


def _source_logits(count_ref, query_gains_ref, sources_ref, *, num_queries, eps, width, dtype, use_matmul):
  """Each source's inverse RMS `[TM, 1]` and masked logits `z = (v . qg) r`, `[TM, Qp]`."""
  count = count_ref[0]
  inv_rms, logits = [], []
  for s in range(sources_ref.shape[0]):
    v_TxD = _source(sources_ref, s, dtype)
    r_Tx1 = jax.lax.rsqrt(jnp.sum(v_TxD * v_TxD, axis=1, keepdims=True) / width + eps)
    inv_rms.append(r_Tx1)
    dots_TxQp = _query_dots(v_TxD, query_gains_ref, num_queries, use_matmul)
    logits.append(jnp.where(s < count, dots_TxQp * r_Tx1, -jnp.inf))
  return inv_rms, logits


def _forward_kernel(count_ref, query_gains_ref, sources_ref, mixtures_ref, lse_ref, *, eps, width, dtype,
                    use_matmul):
  _, logits = _source_logits(count_ref, query_gains_ref, sources_ref, num_queries=mixtures_ref.shape[0], eps=eps,
                             width=width, dtype=dtype, use_matmul=use_matmul)
  weights, denominator_TxQp, max_TxQp = _softmax(logits)
  for q in range(mixtures_ref.shape[0]):
    mixture_TxD = functools.reduce(
        jnp.add, [_column(a, q) * _source(sources_ref, s, dtype) for s, a in enumerate(weights)])
    mixtures_ref[q] = mixture_TxD.astype(mixtures_ref.dtype)
  safe_denominator = jnp.where(denominator_TxQp > 0, denominator_TxQp, 1.0)
  lse_ref[...] = jnp.where(denominator_TxQp > 0, jnp.log(safe_denominator) + max_TxQp, -jnp.inf)


def _backward_kernel(count_ref, query_gains_ref, sources_ref, d_mixtures_ref, d_lse_ref,
                     d_sources_ref, d_query_gains_ref, *, eps, width, dtype, use_matmul):
  num_queries = d_mixtures_ref.shape[0]
  inv_rms, logits = _source_logits(count_ref, query_gains_ref, sources_ref, num_queries=num_queries, eps=eps,
                                   width=width, dtype=dtype, use_matmul=use_matmul)
  weights, _, _ = _softmax(logits)
  num_sources = len(logits)
  lanes = jax.lax.broadcasted_iota(jnp.int32, logits[0].shape, 1)
  d_lse_TxQp = d_lse_ref[...].astype(dtype)
  d_logits = [jnp.zeros_like(z) for z in logits]
  weight_columns = [[_column(a, q) for a in weights] for q in range(num_queries)]
  for q in range(num_queries):
    d_mixture_TxD = d_mixtures_ref[q].astype(dtype)
    d_weights = [jnp.sum(d_mixture_TxD * _source(sources_ref, s, dtype), axis=1, keepdims=True)
                 for s in range(num_sources)]  # do_q . v_s
    d_mixture_dot_out = functools.reduce(jnp.add, [a * dw for a, dw in zip(weight_columns[q], d_weights)])
    d_lse_Tx1 = _column(d_lse_TxQp, q)
    for s, (a, dw) in enumerate(zip(weight_columns[q], d_weights)):
      d_logits[s] = jnp.where(lanes == q, a * (dw - d_mixture_dot_out + d_lse_Tx1), d_logits[s])
  d_query_gains = [jnp.zeros((1, query_gains_ref.shape[1]), dtype) for _ in range(num_queries)]
  for s, (r_Tx1, z, dz) in enumerate(zip(inv_rms, logits, d_logits)):
    v_TxD = _source(sources_ref, s, dtype)
    d_norm_Tx1 = jnp.sum(dz * jnp.where(z == -jnp.inf, 0.0, z), axis=1, keepdims=True)
    d_source_TxD = r_Tx1 * _weighted_queries(dz, query_gains_ref, num_queries, use_matmul)
    d_source_TxD = d_source_TxD - (d_norm_Tx1 * r_Tx1 * r_Tx1 / width) * v_TxD
    for q in range(num_queries):
      d_source_TxD = d_source_TxD + weight_columns[q][s] * d_mixtures_ref[q].astype(dtype)
      d_query_gains[q] = d_query_gains[q] + jnp.sum((_column(dz, q) * r_Tx1) * v_TxD, axis=0, keepdims=True)
    d_sources_ref[s] = d_source_TxD.astype(d_sources_ref.dtype)
  for q in range(num_queries):
    d_query_gains_ref[q:q + 1, :] = d_query_gains[q].astype(d_query_gains_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """Padded sizes of one call: tokens `M` to whole tiles, width for Triton, queries to `Qp`."""

  tokens: int
  tile: int
  width: int
  queries: int

  @classmethod
  def of(cls, target: Target, sources_SxMxD: Array, num_queries: int) -> "_Tiling":
    num_sources, num_tokens, width = sources_SxMxD.shape
    width_padded = target.padded_width(width)
    tile = target.token_tile(num_tokens, num_sources, num_queries, width_padded, sources_SxMxD.dtype.itemsize)
    return cls(_round_up(num_tokens, tile), tile, width_padded, target.padded_queries(num_queries))

  def pad(self, x: Array, token_axis: int, width_axis: int | None) -> Array:
    padding = [(0, 0)] * x.ndim
    padding[token_axis] = (0, self.tokens - x.shape[token_axis])
    if width_axis is not None:
      padding[width_axis] = (0, self.width - x.shape[width_axis])
    return jnp.pad(x, padding)


def _cost(operands, results, *, flops: int, transcendentals: int) -> pl.CostEstimate:
  """What a kernel costs, for the compiler's estimate (which otherwise counts a Pallas call's bytes only in
  part): FLOPs, exp/rsqrt, and the bytes of every operand read and result written once."""
  moved = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((operands, results)))
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=int(moved))


def _forward_call(target: Target, sources_SxMxD, num_valid, query_gains_QxD, *, eps: float):
  (num_sources, num_tokens, width), num_queries = sources_SxMxD.shape, query_gains_QxD.shape[0]
  dtype = compute_dtype(sources_SxMxD.dtype)
  tiling = _Tiling.of(target, sources_SxMxD, num_queries)
  query_gains = jnp.pad(query_gains_QxD.astype(dtype),
                        ((0, tiling.queries - num_queries), (0, tiling.width - width)))
  tile, wide, qp = tiling.tile, tiling.width, tiling.queries
  operands = (jnp.reshape(num_valid, (1,)).astype(jnp.int32), query_gains, tiling.pad(sources_SxMxD, 1, 2))
  out_shape = [jax.ShapeDtypeStruct((num_queries, tiling.tokens, wide), sources_SxMxD.dtype),
               jax.ShapeDtypeStruct((tiling.tokens, qp), dtype)]
  elements = num_sources * tiling.tokens * wide  # logits (and the norm) then mixtures, per source element
  mixtures, lse_MxQp = pl.pallas_call(
      functools.partial(_forward_kernel, eps=eps, width=width, dtype=dtype, use_matmul=target.backend == "tpu"),
      grid=(tiling.tokens // tile,),
      in_specs=[target.count_spec(),
                pl.BlockSpec((qp, wide), lambda i: (0, 0)),
                pl.BlockSpec((num_sources, tile, wide), lambda i: (0, i, 0))],
      out_specs=[pl.BlockSpec((num_queries, tile, wide), lambda i: (0, i, 0)),
                 pl.BlockSpec((tile, qp), lambda i: (i, 0))],
      out_shape=out_shape,
      compiler_params=target.compiler_params(("parallel",)),
      interpret=target.interpret_mode(),
      cost_estimate=_cost(operands, out_shape, flops=elements * (2 + 4 * num_queries),
                          transcendentals=num_sources * tiling.tokens * (num_queries + 1)),
      name="depth_attention_fwd",
  )(*operands)
  return mixtures[:, :num_tokens, :width], lse_MxQp[:num_tokens, :num_queries].T


def _backward_call(target: Target, sources_SxMxD, num_valid, query_gains_QxD, d_mixtures_QxMxD, d_lse_QxM, *,
                   eps: float):
  (num_sources, num_tokens, width), num_queries = sources_SxMxD.shape, query_gains_QxD.shape[0]
  dtype = compute_dtype(sources_SxMxD.dtype)
  tiling = _Tiling.of(target, sources_SxMxD, num_queries)
  tile, wide, qp = tiling.tile, tiling.width, tiling.queries
  num_tiles = tiling.tokens // tile
  query_gains = jnp.pad(query_gains_QxD.astype(dtype), ((0, qp - num_queries), (0, wide - width)))
  d_lse_MxQp = jnp.pad(d_lse_QxM.astype(dtype).T, ((0, tiling.tokens - num_tokens), (0, qp - num_queries)))
  operands = (jnp.reshape(num_valid, (1,)).astype(jnp.int32), query_gains, tiling.pad(sources_SxMxD, 1, 2),
              tiling.pad(d_mixtures_QxMxD.astype(sources_SxMxD.dtype), 1, 2), d_lse_MxQp)
  out_shape = [jax.ShapeDtypeStruct((num_sources, tiling.tokens, wide), sources_SxMxD.dtype),
               jax.ShapeDtypeStruct((num_tiles, num_queries, wide), dtype)]
  elements = num_sources * tiling.tokens * wide  # the forward's logits again, then four products per query
  d_sources, d_query_gains_per_tile = pl.pallas_call(
      functools.partial(_backward_kernel, eps=eps, width=width, dtype=dtype, use_matmul=target.backend == "tpu"),
      grid=(num_tiles,),
      in_specs=[target.count_spec(),
                pl.BlockSpec((qp, wide), lambda i: (0, 0)),
                pl.BlockSpec((num_sources, tile, wide), lambda i: (0, i, 0)),
                pl.BlockSpec((num_queries, tile, wide), lambda i: (0, i, 0)),
                pl.BlockSpec((tile, qp), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((num_sources, tile, wide), lambda i: (0, i, 0)),
                 pl.BlockSpec((None, num_queries, wide), lambda i: (i, 0, 0))],
      out_shape=out_shape,
      compiler_params=target.compiler_params(("parallel",)),
      interpret=target.interpret_mode(),
      cost_estimate=_cost(operands, out_shape, flops=elements * (4 + 10 * num_queries),
                          transcendentals=num_sources * tiling.tokens * (num_queries + 1)),
      name="depth_attention_bwd",
  )(*operands)
  d_query_gains_QxD = jnp.sum(d_query_gains_per_tile, axis=0)[:, :width]
  return d_sources[:, :num_tokens, :width], d_query_gains_QxD.astype(query_gains_QxD.dtype)


def _on_platform(call, target: Target | None, *args):
  """`call(target, *args)`, by default for the target of the platform being lowered for."""
  if target is not None:
    return call(target, *args)
  return jax.lax.platform_dependent(
      *args, tpu=functools.partial(call, TPU), cuda=functools.partial(call, TRITON))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def depth_attention_pallas(
    sources_SxMxD: Array, num_valid: Array | int, query_gains_QxD: Array, eps: float,
    target: Target | None = None,
) -> tuple[Array, Array]:
  """Mixtures `[Q, M, d]` and log-sum-exp `[Q, M]`; the contract of `depth_attention_reference`.

  `target=None` picks the kernel of the platform being lowered for (Mosaic on
  TPU, Triton on CUDA GPUs); `TPU_INTERPRET` runs the TPU kernel on CPU.
  """
  return _on_platform(functools.partial(_forward_call, eps=eps), target,
                      sources_SxMxD, num_valid, query_gains_QxD)


def _pallas_forward(sources_SxMxD, num_valid, query_gains_QxD, eps, target):
  outputs = depth_attention_pallas(sources_SxMxD, num_valid, query_gains_QxD, eps, target)
  return outputs, (sources_SxMxD, num_valid, query_gains_QxD)


def _pallas_backward(eps, target, residuals, cotangents):
  sources_SxMxD, num_valid, query_gains_QxD = residuals
  d_mixtures_QxMxD, d_lse_QxM = cotangents
  d_sources, d_query_gains = _on_platform(functools.partial(_backward_call, eps=eps), target,
                                          sources_SxMxD, num_valid, query_gains_QxD, d_mixtures_QxMxD, d_lse_QxM)
  return d_sources, None, d_query_gains


depth_attention_pallas.defvjp(_pallas_forward, _pallas_backward)
