"""Block and Full AttnRes depth loop with O(N d) activation memory.

Implements docs/method.md §3-§5: sources, block boundaries and the
per-sublayer depth attention (the output query is `output_mix`). Full AttnRes
is the block size 1 case of the same loop (docs/method.md §4).

Memory design (docs/method.md §7, measured on a 2-core CPU prototype first):
the sealed-source buffer `[N, B, T, d]` is append-only, so autodiff of a plain
scan would save it once per layer, O(L N d). Instead the whole scan has a
`jax.custom_vjp`:
- forward: a scan whose carry is the buffer and the partial sum. It stores the partial
  entering a layer only when the buffer cannot give it back (a layer whose first
  sublayer starts a block seals it into the buffer; for Full AttnRes that is
  every layer, so nothing is stored).
- backward: a reverse scan that re-reads the final buffer (every slot a layer
  read was final when it was read; later slots are masked), replays the layer
  and carries the buffer's cotangent. Like the forward, the replay merges the
  slots sealed earlier in the same layer from their values, so the layer adds to
  the buffer's cotangent once (docs/method.md §7).
A sublayer's input is the softmax over the slots sealed before it (the batched
op of `attnres_jax.kernels`, `depth_attention_impl` choosing the jnp reference
or the Pallas kernel), merged by log-sum-exp with the partial sum entering it (at a block start, the block being
sealed): the "mix, then seal" order of docs/method.md §4. So the backward replay only reads
the loop-invariant final buffer; a replay that wrote the seal into it would copy
the buffer every step (measured at 32 sublayers, BTd = 1 MiB: temp memory 1.55x
-> 1.25x the baseline for Block N=8, 3.7x -> 2.1x for Full). The forward seal
writes slot `l // S` of its own carry in place (a non-sealing sublayer rewrites
the slot's value), and no forward mix reads a buffer its step has written: the
sublayers of a layer mix the buffer the layer entered with, and a slot sealed
earlier in the layer is merged from its value (`Seal`). A mix of the freshly
sealed buffer makes XLA copy it (Full at 32 sublayers: 2.83x -> 2.00x PreNorm's
temp memory, docs/method.md §7).

Two-phase (`two_phase=True`, docs/method.md §6): the forward seals first and, at
each block start, answers all `S` queries of the block against the sealed
slots in one batched call (phase 1, `TwoPhase` in the scan carry); each
sublayer then merges its own partial sum by log-sum-exp (phase 2). The buffer
is read once per block instead of once per sublayer. The backward is the
direct replay above: carrying phase-1 results and their cotangents through the
reverse scan would add `2 S B T d` to the backward, where peak memory is (docs/method.md §12.10).

Remat policy (`remat.py`): `full` replays each layer in the backward pass from
the stored partial; `none` and `save_dots` instead keep each sublayer's VJP
residuals (all of them, or the weight-matmul outputs) from the forward pass and
replay only the cheap depth mixing.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnres_jax import axes
from attnres_jax.kernels.depth_attention_op import batched_depth_attention, fold_gains
from attnres_jax.kernels.depth_attention_reference import compute_dtype, inverse_rms, merge_source
from attnres_jax.residuals.mixing_rules import MixingRule, mix_sources, source_weights, visible_sources
from attnres_jax.residuals.remat import checkpointed
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.residuals.types import Array, PyTree, SublayerFn, rms, stack_sublayers
from attnres_jax.sharding import constrain, map_batch_shards


class DepthParams(NamedTuple):
  """Depth-mixing parameters of one sublayer, or stacked `[L_b, K, ...]` of all of them."""

  query: Array  # pseudo-query w_l [d] (learned logits [N + 1] for `rule.logits="learned"`)
  gain: Array  # key-norm gain g_l, same shape
  projection: Array | None = None  # W_l [d, d] of the input-dependent query (`rule.query_projection`)


def sublayer_query(depth: DepthParams, partial_BxTxD: Array) -> Array:
  """`w_l`, or the input-dependent `w_l + W_l h` `[B, T, d]`, `h` the newest source (docs/method.md §8).

  (convention, docs/method.md §12.4) `h` is the partial sum entering the sublayer, before any seal:
  `v_{l-1}` in Full AttnRes (the embedding for sublayer 0), the open block's sum
  in Block; `w_l` stays as the projection's bias.
  """
  if depth.projection is None:
    return depth.query
  dtype = compute_dtype(partial_BxTxD.dtype)
  return depth.query.astype(dtype) + jnp.einsum("btd,de->bte", partial_BxTxD.astype(dtype),
                                                depth.projection.astype(dtype),
                                                precision=jax.lax.Precision.HIGHEST)


class DepthState(NamedTuple):
  """What a sublayer can attend to: sealed blocks b_0..b_{N-1} and the open partial sum."""

  sources_NxBxTxD: Array
  partial_BxTxD: Array


def _slot_attention(queries_QxD: Array, gains_QxD: Array, sources_NxBxTxD: Array, num_visible: Array, *,
                    eps: float, impl: str) -> tuple[Array, Array]:
  """Each query over the first `num_visible` slots: mixtures `[Q, B, T, d]` and log-sum-exp `[Q, B, T]`.

  The batched op of `attnres_jax.kernels` with the implementation `impl`; a
  Pallas kernel runs per device on its batch shard.
  """
  def attend_slots(sources_NxBxTxD, queries_QxD, gains_QxD, num_visible):
    num_slots, batch, length, width = sources_NxBxTxD.shape
    mixtures_QxMxD, lse_QxM = batched_depth_attention(
        sources_NxBxTxD.reshape(num_slots, batch * length, width), num_visible, queries_QxD, gains_QxD, eps, impl)
    num_queries = queries_QxD.shape[0]
    return (mixtures_QxMxD.reshape(num_queries, batch, length, width), lse_QxM.reshape(num_queries, batch, length))

  if impl == "xla":
    return attend_slots(sources_NxBxTxD, queries_QxD, gains_QxD, num_visible)
  return map_batch_shards(attend_slots, (sources_NxBxTxD,), (1,), (queries_QxD, gains_QxD, num_visible), (1, 1))


class Seal(NamedTuple):
  """A slot sealed by an earlier sublayer of the same layer: mixed from its value, not from the buffer."""

  value_BxTxD: Array  # the partial sum it seals
  sealed: Array  # bool: whether that sublayer started a block (else nothing was sealed)
  slot: Array


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


def _rule_inputs(query, gain, sources_NxBxTxD, num_visible, partial_BxTxD, partial_visible, rule,
                 partial_column=None, pending=()):
  """(slots + partial `[N + 1, B, T, d]`, their visibility `[N + 1]`, the gain-folded query) of a mixing rule.

  Learned logits are indexed by slot, the open partial sum by column `N`; a
  partial about to be sealed into slot `partial_column` takes that slot's logit.
  Pending seals are written into the concatenated copy, never into the buffer.
  """
  if rule.logits == "learned" and partial_column is not None:
    query = query.at[-1].set(query[partial_column])
  sources_SxBxTxD = jnp.concatenate([sources_NxBxTxD, partial_BxTxD[None]])
  for value_BxTxD, sealed, slot in pending:
    slot_value = jax.lax.dynamic_index_in_dim(sources_SxBxTxD, slot, keepdims=False)
    sources_SxBxTxD = jax.lax.dynamic_update_index_in_dim(
        sources_SxBxTxD, jnp.where(sealed, value_BxTxD, slot_value), slot, 0)
  visible_S = visible_sources(rule, sources_NxBxTxD.shape[0], num_visible, partial_visible)
  return sources_SxBxTxD, visible_S, fold_gains(query, gain, partial_BxTxD.dtype)


def _mix(query, gain_D, sources_NxBxTxD, num_visible, partial_BxTxD, *, eps, impl, rule, partial_column=None,
         pending=()):
  """Softmax of one query over the visible slots and the partial sum (docs/method.md §2, §6).

  Visible slots are the buffer's and the `pending` seals, which are the newest
  of them. An ablation `rule` (`mixing_rules.py`) mixes the same sources in jnp
  instead; its `query` may be per token (`[B, T, d]`) or learned logits
  (`[N + 1]`).
  """
  if not rule.is_default:
    inputs = _rule_inputs(query, gain_D, sources_NxBxTxD, num_visible, partial_BxTxD, True, rule, partial_column,
                          pending)
    return mix_sources(rule, *inputs, eps)
  num_written = num_visible - sum(jnp.asarray(seal.sealed, jnp.int32) for seal in pending)
  mixtures_1xBxTxD, lse_1xBxT = _slot_attention(query[None], gain_D[None], sources_NxBxTxD, num_written,
                                                eps=eps, impl=impl)
  return merge_partial(mixtures_1xBxTxD[0], lse_1xBxT[0], query, gain_D, partial_BxTxD, eps=eps, pending=pending)


def depth_weights(query: Array, gain_D: Array, state: DepthState, num_visible: Array, partial_visible: Array, *,
                  eps: float, rule: MixingRule) -> Array:
  """Token-averaged weights `[N + 1]` over (slots `0..num_visible-1`, partial), for the statistics.

  Recomputed in jnp from the state after the sublayer's seal (off the hot path,
  only when statistics are asked for); hidden sources get weight 0.
  """
  inputs = _rule_inputs(query, gain_D, state.sources_NxBxTxD, num_visible, state.partial_BxTxD, partial_visible,
                        rule)
  return jnp.mean(source_weights(rule, *inputs, eps), axis=(1, 2, 3))


def sublayer_input(query: Array, gain_D: Array, sources_NxBxTxD: Array, partial_BxTxD: Array, *,
                   starts_block: Array, slot: Array, eps: float, impl: str, rule: MixingRule,
                   pending: tuple[Seal, ...] = ()) -> Array:
  """`h = mix(blocks + [partial])` before sublayer `l` (docs/method.md §4), before any seal.

  The buffer is only read: the sublayer sees the slots sealed before it
  (`0..slot-1` if it starts block `slot`, else `0..slot`) and the partial sum,
  which at a block start is the block being sealed. Of those slots, the ones
  sealed by earlier sublayers of the same layer may be `pending` instead of in
  the buffer (docs/method.md §7: the forward reads the buffer the layer entered with).
  """
  num_slots = sources_NxBxTxD.shape[0]
  return _mix(query, gain_D, sources_NxBxTxD, jnp.where(starts_block, slot, slot + 1), partial_BxTxD, eps=eps,
              impl=impl, rule=rule, partial_column=jnp.where(starts_block, slot, num_slots), pending=pending)


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


class TwoPhase(NamedTuple):
  """Phase 1 of the current block (docs/method.md §6): every query of the block over the slots sealed at its start."""

  mixtures_SxBxTxD: Array
  lse_SxBxT: Array


def _two_phase_input(phase1: TwoPhase, query_D: Array, gain_D: Array, state: DepthState, *,
                     all_queries_LxD: Array, all_gains_LxD: Array, starts_block: Array, slot: Array,
                     position: Array, block_size: int, num_read: int, eps: float, impl: str
                     ) -> tuple[Array, TwoPhase]:
  """`h` of the sublayer at `position` in block `slot`, from the state after its seal (docs/method.md §6).

  At a block start, phase 1 answers the block's `S` queries (rows `slot * S ..`
  of the flat, padded `all_queries_LxD`) against slots `0..slot` in one
  batched call (reading the first `num_read` slots); every sublayer then merges
  its own partial sum by log-sum-exp (the block's first sublayer has none).
  """
  def answer_block(sources_NxBxTxD):
    first = slot * block_size
    block_queries_SxD = jax.lax.dynamic_slice_in_dim(all_queries_LxD, first, block_size)
    block_gains_SxD = jax.lax.dynamic_slice_in_dim(all_gains_LxD, first, block_size)
    return TwoPhase(*_slot_attention(block_queries_SxD, block_gains_SxD, sources_NxBxTxD, slot + 1, eps=eps,
                                     impl=impl))

  phase1 = jax.lax.cond(starts_block, answer_block, lambda _: phase1, state.sources_NxBxTxD[:num_read])
  mixture_BxTxD = jax.lax.dynamic_index_in_dim(phase1.mixtures_SxBxTxD, position, keepdims=False)
  lse_BxT = jax.lax.dynamic_index_in_dim(phase1.lse_SxBxT, position, keepdims=False)
  merged_BxTxD = merge_partial(mixture_BxTxD, lse_BxT, query_D, gain_D, state.partial_BxTxD, eps=eps)
  return jnp.where(starts_block, mixture_BxTxD.astype(merged_BxTxD.dtype), merged_BxTxD), phase1


def output_mix(
    state: DepthState, query: Array, gain: Array, eps: float, impl: str, rule: MixingRule = MixingRule(),
    with_weights: bool = False
) -> tuple[Array, Array | None]:
  """The output query over all blocks and the trailing partial sum (docs/method.md §5)."""
  num_slots = state.sources_NxBxTxD.shape[0]
  h_BxTxD = _mix(query, gain, state.sources_NxBxTxD, num_slots, state.partial_BxTxD, eps=eps, impl=impl,
                 rule=rule)
  if not with_weights:
    return h_BxTxD, None
  return h_BxTxD, depth_weights(query, gain, state, num_slots, True, eps=eps, rule=rule)


def initial_state(embedding_BxTxD: Array, num_slots: int) -> DepthState:
  """Empty buffer, sharded like activations; the embedding is the open partial, sealed as b_0 by sublayer 0."""
  tokens = (axes.BATCH, axes.ACTIVATION_LENGTH)
  return DepthState(
      constrain(jnp.zeros((num_slots,) + embedding_BxTxD.shape, embedding_BxTxD.dtype),
                (None, *tokens, axes.ACTIVATION_EMBED)),
      embedding_BxTxD,
  )


def _schedule_inputs(schedule: BlockSchedule) -> tuple[Array, Array, Array, Array]:
  return (jnp.asarray(schedule.starts_block()), jnp.asarray(schedule.slot()),
          jnp.asarray(schedule.position_in_block()), jnp.asarray(schedule.saved_partial_index()))


def _flat_padded(per_layer_LxKxD: Array, block_size: int) -> Array:
  """`[L_b, K, d]` -> `[L + S - 1, d]` in sublayer order, so every block's `S` rows can be sliced."""
  flat_LxD = per_layer_LxKxD.reshape(-1, per_layer_LxKxD.shape[-1])
  return jnp.pad(flat_LxD, ((0, block_size - 1), (0, 0)), constant_values=1)


def _segment_inputs(xs: PyTree, start: int, end: int) -> PyTree:
  return jax.tree.map(lambda x: x[start:end], xs)


def _stacked(per_segment: list[PyTree]) -> PyTree:
  """Per-layer outputs of the segments' scans, stacked over all layers."""
  return per_segment[0] if len(per_segment) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *per_segment)


def _forward(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll, segments,
             save_residuals, layer_params, depth_LxK, embedding_BxTxD, consts):
  keep_sublayer_vjps = save_residuals and remat != "full"
  num_saved = schedule.num_saved_partials if save_residuals else 0
  saved_PxBxTxD = jnp.zeros((num_saved,) + embedding_BxTxD.shape, embedding_BxTxD.dtype)
  state = initial_state(embedding_BxTxD, schedule.num_slots)
  phase1 = None
  if two_phase:
    block_size = schedule.block_size
    all_queries_LxD, all_gains_LxD = (_flat_padded(x, block_size) for x in (depth_LxK.query, depth_LxK.gain))
    phase1 = jax.eval_shape(lambda: _slot_attention(all_queries_LxD[:block_size], all_gains_LxD[:block_size],
                                                    state.sources_NxBxTxD, 0, eps=eps, impl=impl))
    phase1 = TwoPhase(*(jnp.zeros(x.shape, x.dtype) for x in phase1))

  def layer(carry, xs, *, num_read):
    state, phase1, saved_PxBxTxD = carry
    params, depth_K, starts_block_K, slot_K, position_K, saved_index = xs
    if num_saved:
      index = jnp.maximum(saved_index, 0)
      kept = jnp.where(saved_index >= 0, state.partial_BxTxD, saved_PxBxTxD[index])
      saved_PxBxTxD = jax.lax.dynamic_update_index_in_dim(saved_PxBxTxD, kept, index, 0)
    sublayer_vjps, outputs, stats, auxes = [], [], [], []
    entry_sources_NxBxTxD, pending = state.sources_NxBxTxD[:num_read], ()
    for k, sublayer in enumerate(sublayers):
      where = dict(starts_block=starts_block_K[k], slot=slot_K[k])
      depth = jax.tree.map(lambda x: x[k], depth_K)
      query = sublayer_query(depth, state.partial_BxTxD)
      if two_phase:
        state = seal(state, **where)
        h_BxTxD, phase1 = _two_phase_input(
            phase1, query, depth.gain, state, all_queries_LxD=all_queries_LxD,
            all_gains_LxD=all_gains_LxD, position=position_K[k], block_size=block_size, num_read=num_read,
            eps=eps, impl=impl, **where)
      else:
        h_BxTxD = sublayer_input(query, depth.gain, entry_sources_NxBxTxD, state.partial_BxTxD, eps=eps, impl=impl,
                                 rule=rule, pending=pending, **where)
        pending += (Seal(state.partial_BxTxD, starts_block_K[k], slot_K[k]),)
        state = seal(state, **where)
      if keep_sublayer_vjps:
        out_BxTxD, sublayer_vjp, aux = jax.vjp(checkpointed(sublayer, remat), params, consts, h_BxTxD,
                                               has_aux=True)
        sublayer_vjps.append(sublayer_vjp)
        if k < len(sublayers) - 1:
          outputs.append(out_BxTxD)
      else:
        out_BxTxD, aux = sublayer(params, consts, h_BxTxD)
      auxes.append(aux)
      if collect_stats:
        weights = depth_weights(query, depth.gain, state, slot_K[k] + 1, ~starts_block_K[k], eps=eps, rule=rule)
        stats.append((rms(h_BxTxD), rms(out_BxTxD), weights))
      state = state._replace(partial_BxTxD=state.partial_BxTxD + out_BxTxD)
    return (state, phase1, saved_PxBxTxD), (tuple(sublayer_vjps), tuple(outputs), stats, tuple(auxes))

  xs = (layer_params, depth_LxK) + _schedule_inputs(schedule)
  carry, per_segment = (state, phase1, saved_PxBxTxD), []
  for start, end, num_read in segments:
    carry, ys = jax.lax.scan(functools.partial(layer, num_read=num_read), carry, _segment_inputs(xs, start, end),
                             unroll=unroll)
    per_segment.append(ys)
  state, _, saved_PxBxTxD = carry
  _, _, stats, auxes = _stacked(per_segment)
  stats = _flatten_stats(stats) if collect_stats else {}
  vjp_residuals = [(sublayer_vjps, outputs) for sublayer_vjps, outputs, _, _ in per_segment]
  return state, stats, auxes, (saved_PxBxTxD, vjp_residuals)


def _flatten_stats(stats) -> dict[str, Array]:
  input_rms, output_rms, weights = zip(*stats)
  return {"input_rms": stack_sublayers(input_rms), "output_rms": stack_sublayers(output_rms),
          "depth_weights": stack_sublayers(weights)}


def attnres_loop(
    sublayers: tuple[SublayerFn, ...],
    schedule: BlockSchedule,
    remat: str,
    eps: float,
    impl: str,
    rule: MixingRule,
    two_phase: bool,
    collect_stats: bool,
    layer_params: PyTree,
    depth_LxK: DepthParams,
    embedding_BxTxD: Array,
    consts: PyTree,
    *,
    unroll: bool = False,
    segments: int = 1,
) -> tuple[DepthState, dict[str, Array], tuple[PyTree, ...]]:
  """Runs all sublayers with Block AttnRes mixing; returns the final state, statistics and auxiliary outputs.

  `sublayers` are the K sublayer functions of one scanned layer (attention,
  MLP); `layer_params` their stacked inputs `[num_layers, ...]` (parameters,
  and a KV cache when decoding);
  `depth_LxK` the pseudo-queries, key-norm gains (and query projections),
  stacked `[num_layers, K, ...]`.
  The statistics (if `collect_stats`: `input_rms`, `output_rms` `[L]` and the
  token-averaged `depth_weights` `[L, N + 1]`) and the sublayers' auxiliary
  outputs (stacked `[num_layers, ...]`, one entry per sublayer kind, e.g. new
  keys and values) carry no gradient. `unroll` unrolls the layer scans, forward
  and backward (the TPU compiler's cost analysis counts a scan body once).
  `segments` splits the layers into that many scans, each reading only the
  slots its sublayers can see (`BlockSchedule.segments`, docs/method.md §7): less
  memory traffic, one more traced layer body per segment.
  """
  # Ablated rules index every slot (learned logits): one run, which reads the whole buffer.
  runs = schedule.segments(segments if rule.is_default else 1, two_phase=two_phase)
  return _attnres_loop(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll, runs,
                       layer_params, depth_LxK, embedding_BxTxD, consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9))
def _attnres_loop(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll, segments,
                  layer_params, depth_LxK, embedding_BxTxD, consts):
  state, stats, auxes, _ = _forward(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll,
                                    segments, False, layer_params, depth_LxK, embedding_BxTxD, consts)
  return state, stats, auxes


def _attnres_loop_fwd(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll, segments,
                      layer_params, depth_LxK, embedding_BxTxD, consts):
  state, stats, auxes, saved = _forward(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats,
                                        unroll, segments, True, layer_params, depth_LxK, embedding_BxTxD, consts)
  return (state, stats, auxes), (layer_params, depth_LxK, consts, state, saved)


def _replay_sublayer_input(depth, sources_NxBxTxD, partial_BxTxD, pending_values, *, starts_block, slot,
                           pending_where, eps, impl, rule):
  """`sublayer_input` and the seal as a pure function of a read-only buffer, for `jax.vjp`.

  As in the forward, the slots sealed by earlier sublayers of the layer are
  merged from their values (`pending_values`, with their `(sealed, slot)` in
  `pending_where`), so their cotangents come back per value: no cotangent of the
  whole buffer is needed between the sublayers of a layer (docs/method.md §7).
  Returns h, the partial after the seal, and what the seal writes (the partial),
  whose cotangent the caller reads from the buffer's.
  """
  pending = tuple(Seal(value, sealed, index) for value, (sealed, index) in zip(pending_values, pending_where))
  h_BxTxD = sublayer_input(sublayer_query(depth, partial_BxTxD), depth.gain, sources_NxBxTxD, partial_BxTxD,
                           starts_block=starts_block, slot=slot, eps=eps, impl=impl, rule=rule, pending=pending)
  partial_after_BxTxD = jnp.where(starts_block, jnp.zeros_like(partial_BxTxD), partial_BxTxD)
  return h_BxTxD, partial_after_BxTxD, partial_BxTxD


def _inexact_cotangents(cts: PyTree, consts: PyTree) -> PyTree:
  """The cotangents of the inexact leaves of `consts`; None for integer ones (segment ids), whose float0
  cotangents cannot be summed; `custom_vjp` takes None as a zero cotangent."""
  return jax.tree.map(lambda ct, x: ct if jnp.issubdtype(x.dtype, jnp.inexact) else None, cts, consts)


def _attnres_loop_bwd(sublayers, schedule, remat, eps, impl, rule, two_phase, collect_stats, unroll, segments,
                      residuals, cotangents):
  del two_phase  # the backward replays each sublayer's direct mix against the final buffer
  layer_params, depth_LxK, consts, final, saved = residuals
  saved_PxBxTxD, vjp_residuals = saved
  ct_final, _, _ = cotangents  # statistics and auxiliary outputs carry no gradient
  num_sublayers = len(sublayers)

  def layer_backward(carry, xs, *, num_read):
    ct_state, ct_consts = carry
    params, depth_K, starts_block_K, slot_K, _, saved_index, vjps, outs = xs
    partial_BxTxD = jax.lax.dynamic_index_in_dim(final.sources_NxBxTxD, slot_K[0], keepdims=False)
    if saved_PxBxTxD.shape[0]:
      stored = jax.lax.dynamic_index_in_dim(saved_PxBxTxD, jnp.maximum(saved_index, 0), keepdims=False)
      partial_BxTxD = jnp.where(saved_index >= 0, stored, partial_BxTxD)
    mix_vjps, sublayer_vjps_k, pending_values = [], [], []
    for k, sublayer in enumerate(sublayers):  # replay the layer forward
      where = [(starts_block_K[j], slot_K[j]) for j in range(k)]
      replay = functools.partial(_replay_sublayer_input, starts_block=starts_block_K[k], slot=slot_K[k],
                                 pending_where=where, eps=eps, impl=impl, rule=rule)
      (h_BxTxD, partial_after_BxTxD, _), mix_vjp = jax.vjp(
          replay, jax.tree.map(lambda x: x[k], depth_K), final.sources_NxBxTxD[:num_read], partial_BxTxD,
          tuple(pending_values))
      mix_vjps.append(mix_vjp)
      pending_values.append(partial_BxTxD)  # what sublayer k seals, if it starts a block
      partial_BxTxD = partial_after_BxTxD
      if remat == "full":
        out_BxTxD, sublayer_vjp, _ = jax.vjp(sublayer, params, consts, h_BxTxD, has_aux=True)
      else:
        sublayer_vjp, out_BxTxD = vjps[k], (outs[k] if k < num_sublayers - 1 else None)
      sublayer_vjps_k.append(sublayer_vjp)
      if k < num_sublayers - 1:
        partial_BxTxD = partial_BxTxD + out_BxTxD
    ct_sources, ct_partial = ct_state
    ct_params, ct_depth, ct_pending = None, [None] * num_sublayers, [0.0] * num_sublayers
    d_sources_of_layer = []
    for k in reversed(range(num_sublayers)):  # then back through it
      d_params, d_consts, ct_h_BxTxD = sublayer_vjps_k[k](ct_partial)
      ct_params = d_params if ct_params is None else jax.tree.map(jnp.add, ct_params, d_params)
      ct_consts = jax.tree.map(jnp.add, ct_consts, _inexact_cotangents(d_consts, consts))
      # The sealed value's cotangent: from later layers through the buffer (every slot this layer
      # seals is hidden from its own replays) and from this layer's later sublayers as a pending value.
      ct_sealed = jnp.where(starts_block_K[k], jax.lax.dynamic_index_in_dim(ct_sources, slot_K[k], keepdims=False),
                            0) + ct_pending[k]
      ct_depth[k], d_sources, ct_partial, ct_values = mix_vjps[k]((ct_h_BxTxD, ct_partial, ct_sealed))
      ct_pending[:k] = [total + ct for total, ct in zip(ct_pending[:k], ct_values)]
      d_sources_of_layer.append(d_sources)
    ct_read_RxBxTxD = functools.reduce(jnp.add, d_sources_of_layer, ct_sources[:num_read])
    ct_state = DepthState(jax.lax.dynamic_update_slice_in_dim(ct_sources, ct_read_RxBxTxD, 0, 0), ct_partial)
    return (ct_state, ct_consts), (ct_params, jax.tree.map(lambda *cts: jnp.stack(cts), *ct_depth))

  xs = (layer_params, depth_LxK) + _schedule_inputs(schedule)
  carry, per_segment = (ct_final, _inexact_cotangents(jax.tree.map(jnp.zeros_like, consts), consts)), []
  for (start, end, num_read), residuals_of_segment in reversed(list(zip(segments, vjp_residuals))):
    carry, ys = jax.lax.scan(functools.partial(layer_backward, num_read=num_read), carry,
                             _segment_inputs(xs, start, end) + residuals_of_segment, reverse=True, unroll=unroll)
    per_segment.insert(0, ys)
  (ct_state, ct_consts), (ct_params, ct_depth) = carry, _stacked(per_segment)
  return ct_params, ct_depth, ct_state.partial_BxTxD, ct_consts


_attnres_loop.defvjp(_attnres_loop_fwd, _attnres_loop_bwd)
