"""Mixture-of-Experts SwiGLU FFN: top-k routing, grouped matmuls, expert parallelism (docs/method.md §16).

Routing, in float32 or wider: router logits `x W_r`, scores `softmax` or
`sigmoid` of them; each token picks the `top_k` experts of `scores + bias`
(`expert_bias`, no gradient: DeepSeek-V3's auxiliary-loss-free balancing,
moved by `updated_expert_bias` after each step) and weighs them by the
*unbiased* scores, renormalised over its top-k if `normalize_top_k`, times
`routed_scaling_factor`. `num_shared_experts` always-on experts are one fused
SwiGLU of width `num_shared_experts * d_ff`.

Compute: the `B T K` token-slots are sorted by expert (a stable argsort of the
flat expert ids), the three expert matmuls are grouped matmuls over the sorted
rows (`jax.lax.ragged_dot`, or megablox `gmm` on TPU), then the rows are put
back in slot order, weighed and summed over k. With `capacity_factor > 0` each
expert takes at most `ceil(capacity_factor * T * top_k / E)` slots of each
sequence, first choices first, then by position; the rest contribute 0.

Expert parallelism: inside `sharding.activate`, the experts' weights are split
over the mesh axes their `expert` axis is mapped to, and the tokens over the
batch axes, `expert` among them. The dispatch is an explicit `jax.shard_map`:
each device all-gathers the tokens (and their routing) of its expert group,
runs only the slots of its own experts, and a reduce-scatter (`psum_scatter`)
returns each token's sum to the device that holds it. Routing stays outside,
per token, under GSPMD. All-gather + reduce-scatter rather than an all-to-all:
it is exact and dropless with static shapes, runs on fake CPU devices, and a
device sends and receives `ep - 1` times its own tokens each way, where an
all-to-all moves `top_k (ep - 1) / ep` times them: no more while `ep <= top_k`.
Under tensor parallelism each device holds `d_ff / tensor` of its experts'
width and the partial outputs are summed over `tensor`; FSDP's `d` shards of
the weights are gathered on entry.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import PartitionSpec

from attnres_jax import axes, sharding
from attnres_jax.kernels.depth_attention_reference import compute_dtype
from attnres_jax.model.attention_kernels import target_platform
from attnres_jax.model.layers import TOKEN_ACTIVATIONS, SwiGLU, logical_param, normal_param

Array = jax.Array
IMPLS = ("ragged_dot", "megablox", "megablox_interpret", "auto")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
MEGABLOX_TILE = 128  # megablox gmm tile (rows, contraction, output); rows are padded to a multiple of it
_SLOTS = (axes.BATCH, None, None)  # [B, T, d] tokens or [B, T, K] slots: split over the batch axes only


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """One MoE FFN layer (hashable: a static part of the module)."""
  num_experts: int  # routed experts E
  top_k: int  # routed experts per token, 1 <= top_k <= num_experts
  d_ff: int  # hidden width of each routed (and each shared) SwiGLU expert
  num_shared_experts: int = 0  # always-on experts, fused into one SwiGLU of width num_shared_experts * d_ff
  score_function: str = "softmax"  # softmax | sigmoid (DeepSeek-V3) of the router logits
  normalize_top_k: bool = True  # divide the top-k gate weights by their sum
  routed_scaling_factor: float = 1.0  # multiplies the routed experts' gate weights
  capacity_factor: float = 0.0  # slots per expert and sequence: ceil(factor * T * top_k / E); 0 = dropless
  impl: str = "auto"  # grouped matmul: ragged_dot | megablox (TPU) | megablox_interpret (CPU) | auto
  bias_update_rate: float = 1e-3  # aux-loss-free balancing: expert_bias step per train step; 0 = off

  def capacity(self, seq_len: int) -> int | None:
    """Slots each expert takes per sequence of `seq_len` tokens; None when dropless."""
    if not self.capacity_factor:
      return None
    return math.ceil(self.capacity_factor * seq_len * self.top_k / self.num_experts)


def check_moe_spec(spec: MoESpec, *, expert_parallelism: int = 1, prefix: str = "MoESpec.") -> None:
  """Raises one ValueError naming the first invalid field (`prefix` + field, e.g. "config.model.moe.")."""
  def fail(field: str, requirement: str):
    raise ValueError(f"{prefix}{field}={getattr(spec, field)!r}: {requirement}")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  for field in ("num_experts", "d_ff"):
    if not is_int(getattr(spec, field)) or getattr(spec, field) < 1:
      fail(field, "must be a positive integer")
  if not is_int(spec.top_k) or not 1 <= spec.top_k <= spec.num_experts:
    fail("top_k", f"must be an integer in [1, num_experts={spec.num_experts}]")
  if not is_int(spec.num_shared_experts) or spec.num_shared_experts < 0:
    fail("num_shared_experts", "must be an integer >= 0")
  if spec.score_function not in SCORE_FUNCTIONS:
    fail("score_function", f"must be one of {SCORE_FUNCTIONS}")
  if not isinstance(spec.normalize_top_k, bool):
    fail("normalize_top_k", "must be True or False")
  if not is_real(spec.routed_scaling_factor) or not spec.routed_scaling_factor > 0:
    fail("routed_scaling_factor", "must be a number > 0")
  if not is_real(spec.capacity_factor) or spec.capacity_factor < 0:
    fail("capacity_factor", "must be a number >= 0 (0 = dropless)")
  if spec.impl not in IMPLS:
    fail("impl", f"must be one of {IMPLS}")
  if not is_real(spec.bias_update_rate) or spec.bias_update_rate < 0:
    fail("bias_update_rate", "must be a number >= 0 (0 = no bias balancing)")
  if spec.num_experts % expert_parallelism:
    fail("num_experts", f"must be divisible by the expert mesh axis ({expert_parallelism} devices)")


def spec_from_config(model: Mapping[str, Any]) -> MoESpec:
  """The MoE layers' spec from `config.model` (`moe.*`; each expert is `d_ff` wide)."""
  fields = {field.name for field in dataclasses.fields(MoESpec)} - {"d_ff"}
  return MoESpec(d_ff=model["d_ff"], **{field: model["moe"][field] for field in fields})


def active_params_per_token(d_model: int, spec: MoESpec) -> int:
  """Matmul parameters one token multiplies in one MoE layer: router, its top_k experts, the shared ones."""
  return d_model * spec.num_experts + 3 * d_model * spec.d_ff * (spec.top_k + spec.num_shared_experts)


def updated_expert_bias(bias_E: Array, load_E: Array, rate: float) -> Array:
  """DeepSeek-V3's balancing step: raise the selection bias of under-loaded experts, lower the over-loaded."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


class MoEOutputs(NamedTuple):
  aux_loss: Array  # Switch load-balancing loss E sum_e f_e P_e (gradient through P, the router's)
  z_loss: Array  # router z-loss mean(logsumexp(logits)^2)
  expert_load_E: Array  # f_e: fraction of the routed token-slots per expert (before capacity drops), no gradient
  dropped_fraction: Array  # fraction of token-slots over capacity (0 when dropless)


class Routing(NamedTuple):
  expert_BxTxK: Array  # chosen experts; num_experts where a slot is dropped
  gate_BxTxK: Array  # combine weights; 0 where dropped
  outputs: MoEOutputs


class ExpertWeights(NamedTuple):
  gate_ExDxF: Array
  up_ExDxF: Array
  down_ExFxD: Array


def route(x_BxTxD: Array, router_DxE: Array, bias_E: Array, spec: MoESpec) -> Routing:
  """Top-k experts, gate weights and balancing statistics of every token (docs/method.md §16)."""
  dtype = compute_dtype(x_BxTxD.dtype)
  logits_BxTxE = x_BxTxD.astype(dtype) @ router_DxE.astype(dtype)
  if spec.score_function == "softmax":
    scores_BxTxE = jax.nn.softmax(logits_BxTxE, axis=-1)
    probs_BxTxE = scores_BxTxE
  else:
    scores_BxTxE = jax.nn.sigmoid(logits_BxTxE)
    probs_BxTxE = scores_BxTxE / jnp.sum(scores_BxTxE, axis=-1, keepdims=True)
  _, expert_BxTxK = jax.lax.top_k(scores_BxTxE + jax.lax.stop_gradient(bias_E.astype(dtype)), spec.top_k)
  gate_BxTxK = jnp.take_along_axis(scores_BxTxE, expert_BxTxK, axis=-1)
  if spec.normalize_top_k:
    gate_BxTxK = gate_BxTxK / jnp.sum(gate_BxTxK, axis=-1, keepdims=True)
  gate_BxTxK = spec.routed_scaling_factor * gate_BxTxK
  slots_per_expert_E = jnp.sum(jax.nn.one_hot(expert_BxTxK, spec.num_experts, dtype=dtype), axis=(0, 1, 2))
  load_E = jax.lax.stop_gradient(slots_per_expert_E / expert_BxTxK.size)
  aux_loss = spec.num_experts * jnp.sum(load_E * jnp.mean(probs_BxTxE, axis=(0, 1)))
  z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxTxE, axis=-1)))
  capacity = spec.capacity(x_BxTxD.shape[1])
  dropped_fraction = jnp.zeros((), dtype)
  if capacity is not None:
    keep_BxTxK = within_capacity(expert_BxTxK, spec.num_experts, capacity)
    expert_BxTxK = jnp.where(keep_BxTxK, expert_BxTxK, spec.num_experts)
    gate_BxTxK = jnp.where(keep_BxTxK, gate_BxTxK, 0)
    dropped_fraction = 1 - jnp.mean(keep_BxTxK.astype(dtype))
  return Routing(expert_BxTxK, gate_BxTxK, MoEOutputs(aux_loss, z_loss, load_E, dropped_fraction))


def within_capacity(expert_BxTxK: Array, num_experts: int, capacity: int) -> Array:
  """Whether each slot is among the first `capacity` of its expert in its sequence, in (k, t) order."""
  batch, seq_len, top_k = expert_BxTxK.shape
  expert_BxS = expert_BxTxK.transpose(0, 2, 1).reshape(batch, top_k * seq_len)  # slot s = k T + t
  order_BxS = jnp.argsort(expert_BxS, axis=-1, stable=True)
  sorted_BxS = jnp.take_along_axis(expert_BxS, order_BxS, axis=-1)
  count_BxE = jnp.sum(jax.nn.one_hot(expert_BxS, num_experts, dtype=jnp.int32), axis=1)
  start_BxE = jnp.cumsum(count_BxE, axis=-1) - count_BxE
  rank_BxS = jnp.arange(top_k * seq_len) - jnp.take_along_axis(start_BxE, sorted_BxS, axis=-1)
  keep_BxS = jnp.take_along_axis(rank_BxS < capacity, jnp.argsort(order_BxS, axis=-1), axis=-1)
  return keep_BxS.reshape(batch, top_k, seq_len).transpose(0, 2, 1)


def grouped_matmul(x_MxK: Array, w_GxKxN: Array, group_sizes_G: Array, *, impl: str) -> Array:
  """Rows of group g (consecutive, in order) times `w_GxKxN[g]`; rows past the groups are not defined.

  megablox takes float32 or bfloat16 and a row count that is a multiple of its tile (rows are padded here);
  under a mesh it must run per device (`routed_experts` calls it inside shard_map).
  """
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_MxK, w_GxKxN, group_sizes_G)
  rows = x_MxK.shape[0]
  padded_MxK = jnp.pad(x_MxK, ((0, -rows % MEGABLOX_TILE), (0, 0)))
  out = megablox.gmm(padded_MxK, w_GxKxN, group_sizes_G, preferred_element_type=x_MxK.dtype,
                     tiling=(MEGABLOX_TILE,) * 3, interpret=impl == "megablox_interpret")
  return out[:rows]


def local_experts(x_NxD: Array, expert_NxK: Array, gate_NxK: Array, weights: ExpertWeights, *, first_expert,
                  max_rows: int, impl: str) -> Array:
  """sum_k gate * SwiGLU_e(x) over the slots whose expert e is one of the `weights`' (first_expert + i).

  Slots of other experts (and dropped ones) contribute 0. At most `max_rows` slots are local.
  """
  num_local = weights.gate_ExDxF.shape[0]
  tokens, top_k = expert_NxK.shape
  local_S = expert_NxK.reshape(-1) - first_expert
  local_S = jnp.where((local_S >= 0) & (local_S < num_local), local_S, num_local)  # num_local: not here
  order_S = jnp.argsort(local_S, stable=True)
  group_sizes_E = jnp.bincount(local_S, length=num_local).astype(jnp.int32)
  rows_M = order_S[:max_rows]
  x_MxD = x_NxD[rows_M // top_k]
  matmul = functools.partial(grouped_matmul, group_sizes_G=group_sizes_E, impl=impl)
  hidden_MxF = jax.nn.silu(matmul(x_MxD, weights.gate_ExDxF)) * matmul(x_MxD, weights.up_ExDxF)
  y_MxD = matmul(hidden_MxF, weights.down_ExFxD)
  y_MxD = jnp.where((jnp.arange(max_rows) < jnp.sum(group_sizes_E))[:, None], y_MxD, 0)
  y_SxD = jnp.pad(y_MxD, ((0, local_S.size - max_rows), (0, 0)))
  unsort_S = jnp.zeros_like(order_S).at[order_S].set(jnp.arange(local_S.size), unique_indices=True)
  y_NxKxD = y_SxD[unsort_S].reshape(tokens, top_k, -1)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, gate_NxK.astype(y_NxKxD.dtype))


def routed_experts(x_BxTxD: Array, routing: Routing, weights: ExpertWeights, *, impl: str,
                   capacity: int | None) -> Array:
  """The routed experts' sum per token; inside `sharding.activate`, expert-parallel in `jax.shard_map`."""
  def run(x_BxTxD, expert_BxTxK, gate_BxTxK, weights, *, first_expert):
    batch, seq_len, top_k = expert_BxTxK.shape
    slots = batch * seq_len * top_k
    max_rows = slots if capacity is None else min(slots, weights.gate_ExDxF.shape[0] * capacity * batch)
    out_NxD = local_experts(x_BxTxD.reshape(batch * seq_len, -1), expert_BxTxK.reshape(-1, top_k),
                            gate_BxTxK.reshape(-1, top_k), weights, first_expert=first_expert, max_rows=max_rows,
                            impl=impl)
    return out_NxD.reshape(x_BxTxD.shape)

  if sharding.active_mesh() is None:
    return run(x_BxTxD, routing.expert_BxTxK, routing.gate_BxTxK, weights, first_expert=0)
  batch_axes = _mesh_axes(sharding.activation_spec(_SLOTS, x_BxTxD.shape)[0])
  weight_spec = sharding.activation_spec((axes.EXPERT, axes.EMBED, axes.MLP), weights.gate_ExDxF.shape)
  expert_axes = _mesh_axes(weight_spec[0])
  mlp_axes = tuple(a for a in _mesh_axes(weight_spec[2]) if a not in batch_axes)  # tensor parallel
  gathered = tuple(a for a in expert_axes if a in batch_axes)  # tokens of the expert group, gathered
  summed = tuple(a for a in expert_axes if a not in batch_axes) + mlp_axes  # partial sums over experts / F
  num_local = weights.gate_ExDxF.shape[0] // math.prod(sharding.active_mesh().shape[a] for a in expert_axes)

  def per_device(x_BxTxD, expert_BxTxK, gate_BxTxK, weights):
    if gathered:
      x_BxTxD, expert_BxTxK, gate_BxTxK = (jax.lax.all_gather(v, gathered, axis=0, tiled=True)
                                           for v in (x_BxTxD, expert_BxTxK, gate_BxTxK))
    first_expert = jax.lax.axis_index(expert_axes) * num_local if expert_axes else 0
    out_BxTxD = run(x_BxTxD, expert_BxTxK, gate_BxTxK, weights, first_expert=first_expert)
    if gathered:
      out_BxTxD = jax.lax.psum_scatter(out_BxTxD, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(out_BxTxD, summed) if summed else out_BxTxD

  slots = PartitionSpec(batch_axes or None, None, None)
  expert, mlp = expert_axes or None, mlp_axes or None
  weight_specs = ExpertWeights(PartitionSpec(expert, None, mlp), PartitionSpec(expert, None, mlp),
                               PartitionSpec(expert, mlp, None))
  # check_vma=False: a Pallas kernel's output carries no varying-axes type. shard_map's transpose then divides
  # the output cotangent over the axes out_specs leave out and sums the inputs' over those in_specs leave out.
  return jax.shard_map(per_device, mesh=sharding.active_mesh(), in_specs=(slots, slots, slots, weight_specs),
                       out_specs=slots, check_vma=False)(x_BxTxD, routing.expert_BxTxK, routing.gate_BxTxK, weights)


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def resolve_impl(impl: str) -> str:
  """The grouped matmul `auto` stands for: megablox on TPU (the platform compiled for), ragged_dot elsewhere."""
  if impl != "auto":
    return impl
  return "megablox" if target_platform() == "tpu" else "ragged_dot"


class MoE(nnx.Module):
  """Routed SwiGLU experts plus shared ones (docs/method.md §16); returns the output and `MoEOutputs`."""

  def __init__(self, d_model: int, spec: MoESpec, *, init_std: float, out_std: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    num_experts, d_ff = spec.num_experts, spec.d_ff
    self.router = normal_param(rngs, (d_model, num_experts), init_std, (axes.EMBED, None), param_dtype)
    self.expert_bias = logical_param(jnp.zeros((num_experts,), jnp.float32), (None,))  # no gradient: selection
    in_names, out_names = (axes.EXPERT, axes.EMBED, axes.MLP), (axes.EXPERT, axes.MLP, axes.EMBED)
    self.gate = normal_param(rngs, (num_experts, d_model, d_ff), init_std, in_names, param_dtype)
    self.up = normal_param(rngs, (num_experts, d_model, d_ff), init_std, in_names, param_dtype)
    self.down = normal_param(rngs, (num_experts, d_ff, d_model), out_std, out_names, param_dtype)
    self.shared = SwiGLU(d_model, spec.num_shared_experts * d_ff, init_std=init_std, out_std=out_std, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs) if spec.num_shared_experts else None
    self.spec, self.dtype = spec, dtype

  def __call__(self, x_BxTxD: Array) -> tuple[Array, MoEOutputs]:
    routing = route(x_BxTxD, self.router[...], self.expert_bias[...], self.spec)
    weights = ExpertWeights(*(p[...].astype(self.dtype) for p in (self.gate, self.up, self.down)))
    out_BxTxD = routed_experts(x_BxTxD.astype(self.dtype), routing, weights, impl=resolve_impl(self.spec.impl),
                               capacity=self.spec.capacity(x_BxTxD.shape[1]))
    if self.shared is not None:
      out_BxTxD = out_BxTxD + self.shared(x_BxTxD.astype(self.dtype))
    return sharding.constrain(out_BxTxD, TOKEN_ACTIVATIONS), routing.outputs
