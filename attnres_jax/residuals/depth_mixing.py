"""One sublayer's depth mixing over the source buffer: mix, seal, two-phase, output query.

docs/method.md §3-§6: the buffer holds the sealed blocks `b_0 .. b_{N-1}`
(Full AttnRes: one slot per output), the open partial sum is separate. A
sublayer's input is the softmax over the slots sealed before it (the batched
op of `attnres_jax.kernels`), merged by log-sum-exp with the partial sum
entering it: "mix, then seal". Mixes only read the buffer; `seal` is the one
write (docs/method.md §7 says why). `depth_loop.py` runs these over the layers.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnres_jax import axes
from attnres_jax.kernels.depth_attention_op import batched_depth_attention, fold_gains
from attnres_jax.kernels.depth_attention_reference import inverse_rms, merge_source
from attnres_jax.residuals.mixing_rules import ContentLogits, MixingRule, mix_sources, source_weights
from attnres_jax.residuals.types import Array
from attnres_jax.sharding import constrain, map_batch_shards


@dataclasses.dataclass(frozen=True)
class Mixing:
  """How sources are mixed: the rule, the key norms' epsilon, the batched op's implementation (`kernels/`)."""

  rule: MixingRule = ContentLogits()
  eps: float = 1e-6
  impl: str = "xla"


class DepthParams(NamedTuple):
  """Depth-mixing parameters of one sublayer, or stacked `[L_b, K, ...]` of all of them."""

  query: Array  # pseudo-query w_l [d] (learned logits [N + 1] for `LearnedLogits`)
  gain: Array  # key-norm gain g_l, same shape
  projection: Array | None = None  # W_l [d, d] of the input-dependent query (`ContentLogits.query_projection`)


class DepthState(NamedTuple):
  """What a sublayer can attend to: sealed blocks b_0..b_{N-1} and the open partial sum."""

  sources_NxBxTxD: Array
  partial_BxTxD: Array


class Seal(NamedTuple):
  """A slot sealed by an earlier sublayer of the same layer: mixed from its value, not from the buffer."""

  value_BxTxD: Array  # the partial sum it seals
  sealed: Array  # bool: whether that sublayer started a block (else nothing was sealed)
  slot: Array


class TwoPhase(NamedTuple):
  """Phase 1 of the current block (docs/method.md §6): every query of the block over the slots sealed at its start."""

  mixtures_SxBxTxD: Array
  lse_SxBxT: Array


def sublayer_query(mixing: Mixing, depth: DepthParams, partial_BxTxD: Array) -> Array:
  """The rule's query from the sublayer's parameters; the newest source (convention, docs/method.md §12.4) is
  the partial sum entering the sublayer, before any seal."""
  return mixing.rule.sublayer_query(depth.query, depth.projection, partial_BxTxD, mixing.eps)


def slot_attention(mixing: Mixing, queries_QxD: Array, gains_QxD: Array, sources_NxBxTxD: Array,
                   num_visible: Array) -> tuple[Array, Array]:
  """Each query over the first `num_visible` slots: mixtures `[Q, B, T, d]` and log-sum-exp `[Q, B, T]`.

  The batched op of `attnres_jax.kernels`; a Pallas kernel runs per device on its batch shard.
  """
  def attend_slots(sources_NxBxTxD, queries_QxD, gains_QxD, num_visible):
    num_slots, batch, length, width = sources_NxBxTxD.shape
    mixtures_QxMxD, lse_QxM = batched_depth_attention(
        sources_NxBxTxD.reshape(num_slots, batch * length, width), num_visible, queries_QxD, gains_QxD,
        mixing.eps, mixing.impl)
    num_queries = queries_QxD.shape[0]
    return (mixtures_QxMxD.reshape(num_queries, batch, length, width), lse_QxM.reshape(num_queries, batch, length))

  if mixing.impl == "xla":
    return attend_slots(sources_NxBxTxD, queries_QxD, gains_QxD, num_visible)
  return map_batch_shards(attend_slots, (sources_NxBxTxD,), (1,), (queries_QxD, gains_QxD, num_visible), (1, 1))


def _merge(mixture_BxTxD: Array, lse_BxT: Array, query_gain_D: Array, source_BxTxD: Array, *,
           eps: float) -> tuple[Array, Array]:
  """One more source merged into a softmax by log-sum-exp (docs/method.md §6): the mixture and the new lse."""
  logit_BxT = jnp.einsum("...d,d->...", source_BxTxD, query_gain_D, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=query_gain_D.dtype) * inverse_rms(source_BxTxD, eps)
  merged_BxTxD, _ = merge_source(mixture_BxTxD, lse_BxT, source_BxTxD, logit_BxT)
  return merged_BxTxD, jnp.logaddexp(lse_BxT, logit_BxT)


def merge_partial(mixture_BxTxD: Array, lse_BxT: Array, query_D: Array, gain_D: Array, partial_BxTxD: Array, *,
                  eps: float, pending: tuple[Seal, ...] = ()) -> Array:
  """Phase 2 (docs/method.md §6): the pending seals, then the partial sum, merged into the slots' softmax."""
  query_gain_D = fold_gains(query_D[None], gain_D[None], partial_BxTxD.dtype)[0]
  mixture_BxTxD = mixture_BxTxD.astype(query_gain_D.dtype)
  for value_BxTxD, sealed, _ in pending:
    merged = _merge(mixture_BxTxD, lse_BxT, query_gain_D, value_BxTxD, eps=eps)
    mixture_BxTxD, lse_BxT = (jnp.where(sealed, new, old) for new, old in zip(merged, (mixture_BxTxD, lse_BxT)))
  h_BxTxD, _ = _merge(mixture_BxTxD, lse_BxT, query_gain_D, partial_BxTxD, eps=eps)
  return h_BxTxD.astype(partial_BxTxD.dtype)


def _rule_inputs(rule: MixingRule, query, gain, sources_NxBxTxD, num_visible, partial_BxTxD, partial_visible,
                 partial_column=None, pending=()):
  """(slots + partial `[N + 1, B, T, d]`, their visibility `[N + 1]`, the gain-folded query) of a jnp rule.

  Pending seals are written into the concatenated copy, never into the buffer.
  """
  query = rule.column_query(query, partial_column)
  sources_SxBxTxD = jnp.concatenate([sources_NxBxTxD, partial_BxTxD[None]])
  for value_BxTxD, sealed, slot in pending:
    slot_value = jax.lax.dynamic_index_in_dim(sources_SxBxTxD, slot, keepdims=False)
    sources_SxBxTxD = jax.lax.dynamic_update_index_in_dim(
        sources_SxBxTxD, jnp.where(sealed, value_BxTxD, slot_value), slot, 0)
  visible_S = rule.visible(sources_NxBxTxD.shape[0], num_visible, partial_visible)
  return sources_SxBxTxD, visible_S, fold_gains(query, gain, partial_BxTxD.dtype)


def _mix(mixing: Mixing, query, gain_D, sources_NxBxTxD, num_visible, partial_BxTxD, *, partial_column=None,
         pending=()):
  """Softmax of one query over the visible slots and the partial sum (docs/method.md §2, §6).

  Visible slots are the buffer's and the `pending` seals, which are the newest
  of them. A rule the batched op does not compute mixes the same sources in
  jnp instead; its `query` may be per token (`[B, T, d]`) or learned logits (`[N + 1]`).
  """
  if not mixing.rule.fused:
    inputs = _rule_inputs(mixing.rule, query, gain_D, sources_NxBxTxD, num_visible, partial_BxTxD, True,
                          partial_column, pending)
    return mix_sources(mixing.rule, *inputs, mixing.eps)
  num_written = num_visible - sum(jnp.asarray(seal.sealed, jnp.int32) for seal in pending)
  mixtures_1xBxTxD, lse_1xBxT = slot_attention(mixing, query[None], gain_D[None], sources_NxBxTxD, num_written)
  return merge_partial(mixtures_1xBxTxD[0], lse_1xBxT[0], query, gain_D, partial_BxTxD, eps=mixing.eps,
                       pending=pending)


def depth_weights(mixing: Mixing, query: Array, gain_D: Array, state: DepthState, num_visible: Array,
                  partial_visible: Array) -> Array:
  """Token-averaged weights `[N + 1]` over (slots `0..num_visible-1`, partial), for the statistics.

  Recomputed in jnp from the state after the sublayer's seal (off the hot path,
  only when statistics are asked for); hidden sources get weight 0.
  """
  inputs = _rule_inputs(mixing.rule, query, gain_D, state.sources_NxBxTxD, num_visible, state.partial_BxTxD,
                        partial_visible)
  return jnp.mean(source_weights(mixing.rule, *inputs, mixing.eps), axis=(1, 2, 3))


def sublayer_input(mixing: Mixing, query: Array, gain_D: Array, sources_NxBxTxD: Array, partial_BxTxD: Array, *,
                   starts_block: Array, slot: Array, pending: tuple[Seal, ...] = ()) -> Array:
  """`h = mix(blocks + [partial])` before sublayer `l` (docs/method.md §4), before any seal.

  The buffer is only read: the sublayer sees the slots sealed before it
  (`0..slot-1` if it starts block `slot`, else `0..slot`) and the partial sum,
  which at a block start is the block being sealed. Of those slots, the ones
  sealed by earlier sublayers of the same layer may be `pending` instead of in
  the buffer (docs/method.md §7: the forward reads the buffer the layer entered with).
  """
  num_slots = sources_NxBxTxD.shape[0]
  return _mix(mixing, query, gain_D, sources_NxBxTxD, jnp.where(starts_block, slot, slot + 1), partial_BxTxD,
              partial_column=jnp.where(starts_block, slot, num_slots), pending=pending)


def seal(state: DepthState, *, starts_block: Array, slot: Array) -> DepthState:
  """At a block start the partial sum becomes `b_slot` and restarts from zero (docs/method.md §4).

  Writes in place; elsewhere the slot is rewritten with its own value.
  """
  slot_value = jax.lax.dynamic_index_in_dim(state.sources_NxBxTxD, slot, keepdims=False)
  sealed_BxTxD = jnp.where(starts_block, state.partial_BxTxD, slot_value)
  return DepthState(
      jax.lax.dynamic_update_index_in_dim(state.sources_NxBxTxD, sealed_BxTxD, slot, 0),
      jnp.where(starts_block, jnp.zeros_like(state.partial_BxTxD), state.partial_BxTxD),
  )


def two_phase_input(mixing: Mixing, phase1: TwoPhase, query_D: Array, gain_D: Array, state: DepthState, *,
                    block_queries: tuple[Array, Array], starts_block: Array, slot: Array, position: Array,
                    block_size: int, num_read: int) -> tuple[Array, TwoPhase]:
  """`h` of the sublayer at `position` in block `slot`, from the state after its seal (docs/method.md §6).

  At a block start, phase 1 answers the block's `S` queries (rows `slot * S ..`
  of the flat, padded queries and gains `block_queries`) against slots
  `0..slot` in one batched call (reading the first `num_read` slots); every
  sublayer then merges its own partial sum by log-sum-exp (the block's first
  sublayer has none).
  """
  def answer_block(sources_NxBxTxD):
    queries_SxD, gains_SxD = (jax.lax.dynamic_slice_in_dim(x, slot * block_size, block_size) for x in block_queries)
    return TwoPhase(*slot_attention(mixing, queries_SxD, gains_SxD, sources_NxBxTxD, slot + 1))

  phase1 = jax.lax.cond(starts_block, answer_block, lambda _: phase1, state.sources_NxBxTxD[:num_read])
  mixture_BxTxD = jax.lax.dynamic_index_in_dim(phase1.mixtures_SxBxTxD, position, keepdims=False)
  lse_BxT = jax.lax.dynamic_index_in_dim(phase1.lse_SxBxT, position, keepdims=False)
  merged_BxTxD = merge_partial(mixture_BxTxD, lse_BxT, query_D, gain_D, state.partial_BxTxD, eps=mixing.eps)
  return jnp.where(starts_block, mixture_BxTxD.astype(merged_BxTxD.dtype), merged_BxTxD), phase1


def output_mix(mixing: Mixing, state: DepthState, query: Array, gain: Array, *,
               with_weights: bool = False) -> tuple[Array, Array | None]:
  """The output query over all blocks and the trailing partial sum (docs/method.md §5)."""
  num_slots = state.sources_NxBxTxD.shape[0]
  h_BxTxD = _mix(mixing, query, gain, state.sources_NxBxTxD, num_slots, state.partial_BxTxD)
  if not with_weights:
    return h_BxTxD, None
  return h_BxTxD, depth_weights(mixing, query, gain, state, num_slots, True)


def initial_state(embedding_BxTxD: Array, num_slots: int) -> DepthState:
  """Empty buffer, sharded like activations; the embedding is the open partial, sealed as b_0 by sublayer 0."""
  tokens = (axes.BATCH, axes.ACTIVATION_LENGTH)
  return DepthState(
      constrain(jnp.zeros((num_slots,) + embedding_BxTxD.shape, embedding_BxTxD.dtype),
                (None, *tokens, axes.ACTIVATION_EMBED)),
      embedding_BxTxD,
  )
