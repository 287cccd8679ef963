"""The Block / Full AttnRes depth loop: a scan over layers with a custom VJP (docs/method.md §4-§7).

The forward scans the layers carrying the sealed-source buffer and the
partial sum (`depth_mixing.py` mixes and seals); it stores the partial
entering a layer only where the buffer cannot give it back. The backward
scans in reverse over the **final** buffer, replays each layer (the mixes as
pure functions of that read-only buffer, the sublayers under the remat policy
or from their saved VJPs) and runs back through it. Why this is exact and
what it saves: docs/method.md §7. Full AttnRes is block size 1 (§4).

Sublayers return a `SublayerOutput`: their auxiliary losses (an MoE's load
balancing) get gradients through the custom VJP, their side outputs (new keys
and values, expert loads) do not. Layers come in `LayerGroup`s of consecutive
layers sharing sublayer functions (dense layers, then MoE ones).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnres_jax.residuals.depth_mixing import (DepthParams, DepthState, Mixing, Seal, TwoPhase, depth_weights,
                                                initial_state, seal, slot_attention, sublayer_input, sublayer_query,
                                                two_phase_input)
from attnres_jax.residuals.remat import checkpointed
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.residuals.types import (Array, LayerGroup, LoopOutput, PyTree, SublayerFn, concatenate_layers,
                                         differentiable, flatten_stats, group_sizes, layer_runs, rms, stacked_runs)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """The static part of the AttnRes depth loop."""

  schedule: BlockSchedule
  mixing: Mixing = Mixing()
  remat: str = "full"  # remat.py: full replays each layer's sublayers; none / save_dots keep their VJPs
  two_phase: bool = False  # docs/method.md §6 (a `fused` rule only)
  collect_stats: bool = False  # per-sublayer input / output RMS and token-averaged depth weights
  unroll: bool = False  # unroll the layer scans (the TPU compiler's cost analysis counts a scan body once)
  segments: int = 1  # scans over runs of layers, each reading only the slots it sees (docs/method.md §7)

  def runs(self, sizes: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """`(group, start, end, num_read)` of each scan; jnp rules (learned logits index every slot) read all."""
    count = self.segments if self.mixing.rule.fused else 1
    return layer_runs(self.schedule.segments(count, two_phase=self.two_phase), sizes)


class _Carry(NamedTuple):
  state: DepthState
  phase1: TwoPhase | None  # two-phase: the current block's phase-1 answers
  saved_PxBxTxD: Array  # partials entering the layers that do not start a block (backward only)


class _Tables(NamedTuple):
  """Per-layer scan inputs: the depth parameters `[K, ...]` and the schedule (`schedule.py`)."""

  depth_K: DepthParams
  starts_block_K: Array
  slot_K: Array
  position_K: Array
  saved_index: Array


def _tables(schedule: BlockSchedule, depth_LxK: DepthParams) -> _Tables:
  return _Tables(depth_LxK, *(jnp.asarray(table) for table in (
      schedule.starts_block(), schedule.slot(), schedule.position_in_block(), schedule.saved_partial_index())))


def _block_queries(spec: LoopSpec, depth_LxK: DepthParams) -> tuple[Array, Array] | None:
  """Two-phase: queries and gains `[L + S - 1, d]` in sublayer order, padded so every block's `S` rows slice."""
  if not spec.two_phase:
    return None
  pad = ((0, spec.schedule.block_size - 1), (0, 0))
  return tuple(jnp.pad(x.reshape(-1, x.shape[-1]), pad, constant_values=1) for x in (depth_LxK.query, depth_LxK.gain))


def _initial_carry(spec: LoopSpec, embedding_BxTxD: Array, block_queries, *, save_partials: bool) -> _Carry:
  num_saved = spec.schedule.num_saved_partials if save_partials else 0
  state = initial_state(embedding_BxTxD, spec.schedule.num_slots)
  phase1 = None
  if block_queries is not None:
    size = spec.schedule.block_size
    shapes = jax.eval_shape(lambda: slot_attention(spec.mixing, block_queries[0][:size], block_queries[1][:size],
                                                   state.sources_NxBxTxD, 0))
    phase1 = TwoPhase(*(jnp.zeros(x.shape, x.dtype) for x in shapes))
  return _Carry(state, phase1, jnp.zeros((num_saved,) + embedding_BxTxD.shape, embedding_BxTxD.dtype))


def _store_entering_partial(saved_PxBxTxD: Array, partial_BxTxD: Array, saved_index: Array) -> Array:
  """Keeps the partial entering a layer at `saved_index` (a no-op write at index 0 where it is -1)."""
  if not saved_PxBxTxD.shape[0]:
    return saved_PxBxTxD
  index = jnp.maximum(saved_index, 0)
  kept = jnp.where(saved_index >= 0, partial_BxTxD, saved_PxBxTxD[index])
  return jax.lax.dynamic_update_index_in_dim(saved_PxBxTxD, kept, index, 0)


def _sublayer_stats(spec: LoopSpec, query, gain, state: DepthState, h_BxTxD, out_BxTxD, *, starts_block, slot):
  weights = depth_weights(spec.mixing, query, gain, state, slot + 1, ~starts_block)
  return rms(h_BxTxD), rms(out_BxTxD), weights


def _layer_forward(carry: _Carry, xs, *, sublayers: tuple[SublayerFn, ...], spec: LoopSpec, consts: PyTree,
                   block_queries, num_read: int, keep_vjps: bool):
  """One layer's sublayers: each mixes its input, seals, runs and adds its output to the partial sum.

  Direct mixing reads the buffer the layer entered with; a slot sealed earlier
  in the layer is merged from its value (`Seal`, docs/method.md §7).
  """
  params, tables = xs
  state, phase1 = carry.state, carry.phase1
  saved_PxBxTxD = _store_entering_partial(carry.saved_PxBxTxD, state.partial_BxTxD, tables.saved_index)
  entry_sources_NxBxTxD, pending = state.sources_NxBxTxD[:num_read], ()
  vjps, outputs, aux_losses, sides, stats = [], [], [], [], []
  for k, sublayer in enumerate(sublayers):
    where = dict(starts_block=tables.starts_block_K[k], slot=tables.slot_K[k])
    depth = jax.tree.map(lambda x: x[k], tables.depth_K)
    query = sublayer_query(spec.mixing, depth, state.partial_BxTxD)
    if spec.two_phase:
      state = seal(state, **where)
      h_BxTxD, phase1 = two_phase_input(spec.mixing, phase1, query, depth.gain, state, block_queries=block_queries,
                                        position=tables.position_K[k], block_size=spec.schedule.block_size,
                                        num_read=num_read, **where)
    else:
      h_BxTxD = sublayer_input(spec.mixing, query, depth.gain, entry_sources_NxBxTxD, state.partial_BxTxD,
                               pending=pending, **where)
      pending += (Seal(state.partial_BxTxD, where["starts_block"], where["slot"]),)
      state = seal(state, **where)
    primal = differentiable(sublayer)
    if keep_vjps:
      (out_BxTxD, aux_loss), vjp, side = jax.vjp(checkpointed(primal, spec.remat), params, consts, h_BxTxD,
                                                 has_aux=True)
      vjps.append(vjp)
      if k < len(sublayers) - 1:
        outputs.append(out_BxTxD)
    else:
      (out_BxTxD, aux_loss), side = primal(params, consts, h_BxTxD)
    aux_losses.append(aux_loss)
    sides.append(side)
    if spec.collect_stats:
      stats.append(_sublayer_stats(spec, query, depth.gain, state, h_BxTxD, out_BxTxD, **where))
    state = state._replace(partial_BxTxD=state.partial_BxTxD + out_BxTxD)
  ys = (tuple(vjps), tuple(outputs), sum(aux_losses), tuple(sides), stats)
  return _Carry(state, phase1, saved_PxBxTxD), ys


def _forward(groups: tuple[tuple[SublayerFn, ...], ...], spec: LoopSpec, group_inputs, depth_LxK, embedding_BxTxD,
             consts, *, save_residuals: bool):
  """The forward scans; with `save_residuals`, also what the backward needs (stored partials, sublayer VJPs)."""
  tables, block_queries = _tables(spec.schedule, depth_LxK), _block_queries(spec, depth_LxK)
  carry = _initial_carry(spec, embedding_BxTxD, block_queries, save_partials=save_residuals)
  offsets = _group_offsets(group_inputs)
  per_run = []
  for group, start, end, num_read in spec.runs(group_sizes(group_inputs)):
    step = functools.partial(_layer_forward, sublayers=groups[group], spec=spec, consts=consts,
                             block_queries=block_queries, num_read=num_read,
                             keep_vjps=save_residuals and spec.remat != "full")
    xs = (_layers(group_inputs[group], start - offsets[group], end - offsets[group]), _layers(tables, start, end))
    carry, ys = jax.lax.scan(step, carry, xs, unroll=spec.unroll)
    per_run.append((group, ys))
  aux_loss = sum(jnp.sum(ys[2]) for _, ys in per_run)
  sides = stacked_runs([(group, ys[3]) for group, ys in per_run], len(groups))
  stats = flatten_stats([ys[4] for _, ys in per_run]) if spec.collect_stats else {}
  vjp_residuals = [(ys[0], ys[1]) for _, ys in per_run]
  output = LoopOutput(carry.state, aux_loss, sides, stats)
  return output, (carry.saved_PxBxTxD, vjp_residuals)


def _group_offsets(group_inputs) -> list[int]:
  sizes = group_sizes(group_inputs)
  return [sum(sizes[:i]) for i in range(len(sizes))]


def _layers(xs: PyTree, start: int, end: int) -> PyTree:
  return jax.tree.map(lambda x: x[start:end], xs)


def attnres_loop(groups: tuple[LayerGroup, ...], spec: LoopSpec, *, depth_LxK: DepthParams, embedding_BxTxD: Array,
                 consts: PyTree) -> LoopOutput:
  """Runs every layer's sublayers with Block AttnRes mixing (Full: block size 1).

  `groups`: consecutive runs of layers, each with its sublayer functions (the
  same number `K` in every group) and their inputs stacked `[layers, ...]`
  (parameters, and a KV cache when decoding); `depth_LxK`: every sublayer's
  pseudo-query, key-norm gain (and query projection), stacked `[L_b, K, ...]`;
  `consts`: inputs shared by all layers (RoPE tables, segment ids). Returns the
  final `DepthState`, the sum of the sublayers' auxiliary losses, their side
  outputs (per group and sublayer kind, stacked over the group's layers) and,
  with `spec.collect_stats`, `input_rms`, `output_rms` `[L]` and the
  token-averaged `depth_weights` `[L, N + 1]`. Statistics and side outputs carry
  no gradient.
  """
  sublayers = tuple(group.sublayers for group in groups)
  return _attnres_loop(sublayers, spec, tuple(group.inputs for group in groups), depth_LxK, embedding_BxTxD, consts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attnres_loop(groups, spec, group_inputs, depth_LxK, embedding_BxTxD, consts):
  output, _ = _forward(groups, spec, group_inputs, depth_LxK, embedding_BxTxD, consts, save_residuals=False)
  return output


def _attnres_loop_fwd(groups, spec, group_inputs, depth_LxK, embedding_BxTxD, consts):
  output, saved = _forward(groups, spec, group_inputs, depth_LxK, embedding_BxTxD, consts, save_residuals=True)
  return output, (group_inputs, depth_LxK, consts, output.state, saved)


def _replay_sublayer_input(mixing: Mixing, depth, sources_NxBxTxD, partial_BxTxD, pending_values, *, starts_block,
                           slot, pending_where):
  """`sublayer_input` and the seal as a pure function of a read-only buffer, for `jax.vjp`.

  As in the forward, the slots sealed by earlier sublayers of the layer are
  merged from their values (`pending_values`, with their `(sealed, slot)` in
  `pending_where`), so their cotangents come back per value: no cotangent of the
  whole buffer is needed between the sublayers of a layer (docs/method.md §7).
  Returns h, the partial after the seal, and what the seal writes (the partial),
  whose cotangent the caller reads from the buffer's.
  """
  pending = tuple(Seal(value, sealed, index) for value, (sealed, index) in zip(pending_values, pending_where))
  h_BxTxD = sublayer_input(mixing, sublayer_query(mixing, depth, partial_BxTxD), depth.gain, sources_NxBxTxD,
                           partial_BxTxD, starts_block=starts_block, slot=slot, pending=pending)
  partial_after_BxTxD = jnp.where(starts_block, jnp.zeros_like(partial_BxTxD), partial_BxTxD)
  return h_BxTxD, partial_after_BxTxD, partial_BxTxD


def _inexact_cotangents(cts: PyTree, consts: PyTree) -> PyTree:
  """The cotangents of the inexact leaves of `consts`; None for integer ones (segment ids), whose float0
  cotangents cannot be summed; `custom_vjp` takes None as a zero cotangent."""
  return jax.tree.map(lambda ct, x: ct if jnp.issubdtype(x.dtype, jnp.inexact) else None, cts, consts)


def _entering_partial(final: DepthState, saved_PxBxTxD: Array, tables: _Tables) -> Array:
  """The partial entering a layer: the slot its first sublayer sealed, or the stored copy."""
  partial_BxTxD = jax.lax.dynamic_index_in_dim(final.sources_NxBxTxD, tables.slot_K[0], keepdims=False)
  if not saved_PxBxTxD.shape[0]:
    return partial_BxTxD
  stored = jax.lax.dynamic_index_in_dim(saved_PxBxTxD, jnp.maximum(tables.saved_index, 0), keepdims=False)
  return jnp.where(tables.saved_index >= 0, stored, partial_BxTxD)


def _replay_layer(params, tables: _Tables, saved_vjps, *, sublayers, spec: LoopSpec, consts, final: DepthState,
                  saved_PxBxTxD: Array, num_read: int):
  """The layer's forward again, from the final buffer: each sublayer's mix VJP and sublayer VJP."""
  saved_sublayer_vjps, outputs = saved_vjps
  partial_BxTxD = _entering_partial(final, saved_PxBxTxD, tables)
  mix_vjps, sublayer_vjps, pending_values = [], [], []
  for k, sublayer in enumerate(sublayers):
    where = [(tables.starts_block_K[j], tables.slot_K[j]) for j in range(k)]
    replay = functools.partial(_replay_sublayer_input, spec.mixing, starts_block=tables.starts_block_K[k],
                               slot=tables.slot_K[k], pending_where=where)
    (h_BxTxD, partial_after_BxTxD, _), mix_vjp = jax.vjp(
        replay, jax.tree.map(lambda x: x[k], tables.depth_K), final.sources_NxBxTxD[:num_read], partial_BxTxD,
        tuple(pending_values))
    mix_vjps.append(mix_vjp)
    pending_values.append(partial_BxTxD)  # what sublayer k seals, if it starts a block
    partial_BxTxD = partial_after_BxTxD
    if spec.remat == "full":
      (out_BxTxD, _), sublayer_vjp, _ = jax.vjp(differentiable(sublayer), params, consts, h_BxTxD, has_aux=True)
    else:
      sublayer_vjp, out_BxTxD = saved_sublayer_vjps[k], (outputs[k] if k < len(sublayers) - 1 else None)
    sublayer_vjps.append(sublayer_vjp)
    if k < len(sublayers) - 1:
      partial_BxTxD = partial_BxTxD + out_BxTxD
  return mix_vjps, sublayer_vjps


def _layer_backward(carry, xs, *, sublayers, spec: LoopSpec, consts, final: DepthState, saved_PxBxTxD: Array,
                    ct_aux_loss: Array, num_read: int):
  """Back through one layer's sublayers, last first, carrying the buffer's and the partial's cotangents."""
  ct_state, ct_consts = carry
  params, tables, saved_vjps = xs
  mix_vjps, sublayer_vjps = _replay_layer(params, tables, saved_vjps, sublayers=sublayers, spec=spec, consts=consts,
                                          final=final, saved_PxBxTxD=saved_PxBxTxD, num_read=num_read)
  num_sublayers = len(sublayers)
  ct_sources, ct_partial = ct_state
  ct_params, ct_depth, ct_pending, d_sources_of_layer = None, [None] * num_sublayers, [0.0] * num_sublayers, []
  for k in reversed(range(num_sublayers)):
    d_params, d_consts, ct_h_BxTxD = sublayer_vjps[k]((ct_partial, ct_aux_loss))
    ct_params = d_params if ct_params is None else jax.tree.map(jnp.add, ct_params, d_params)
    ct_consts = jax.tree.map(jnp.add, ct_consts, _inexact_cotangents(d_consts, consts))
    # The sealed value's cotangent: from later layers through the buffer (every slot this layer
    # seals is hidden from its own replays) and from this layer's later sublayers as a pending value.
    ct_sealed = jnp.where(tables.starts_block_K[k],
                          jax.lax.dynamic_index_in_dim(ct_sources, tables.slot_K[k], keepdims=False), 0) + ct_pending[k]
    ct_depth[k], d_sources, ct_partial, ct_values = mix_vjps[k]((ct_h_BxTxD, ct_partial, ct_sealed))
    ct_pending[:k] = [total + ct for total, ct in zip(ct_pending[:k], ct_values)]
    d_sources_of_layer.append(d_sources)
  ct_read_RxBxTxD = functools.reduce(jnp.add, d_sources_of_layer, ct_sources[:num_read])
  ct_state = DepthState(jax.lax.dynamic_update_slice_in_dim(ct_sources, ct_read_RxBxTxD, 0, 0), ct_partial)
  return (ct_state, ct_consts), (ct_params, jax.tree.map(lambda *cts: jnp.stack(cts), *ct_depth))


def _attnres_loop_bwd(groups, spec, residuals, ct_output: LoopOutput):
  group_inputs, depth_LxK, consts, final, (saved_PxBxTxD, vjp_residuals) = residuals
  tables, offsets = _tables(spec.schedule, depth_LxK), _group_offsets(group_inputs)
  carry = (ct_output.state, _inexact_cotangents(jax.tree.map(jnp.zeros_like, consts), consts))
  runs, per_run = spec.runs(group_sizes(group_inputs)), []
  for (group, start, end, num_read), saved_vjps in reversed(list(zip(runs, vjp_residuals))):
    step = functools.partial(_layer_backward, sublayers=groups[group], spec=spec, consts=consts, final=final,
                             saved_PxBxTxD=saved_PxBxTxD, ct_aux_loss=ct_output.aux_loss, num_read=num_read)
    xs = (_layers(group_inputs[group], start - offsets[group], end - offsets[group]), _layers(tables, start, end),
          saved_vjps)
    carry, ys = jax.lax.scan(step, carry, xs, reverse=True, unroll=spec.unroll)
    per_run.insert(0, (group, ys))
  (ct_state, ct_consts) = carry
  ct_group_inputs = stacked_runs([(group, ys[0]) for group, ys in per_run], len(groups))
  ct_depth = concatenate_layers([ys[1] for _, ys in per_run])
  return ct_group_inputs, ct_depth, ct_state.partial_BxTxD, ct_consts


_attnres_loop.defvjp(_attnres_loop_fwd, _attnres_loop_bwd)
