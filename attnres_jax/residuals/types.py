"""What the depth loops share: the sublayer interface, layer groups, the loops' output and their bookkeeping."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


class SublayerOutput(NamedTuple):
  """What a sublayer returns to a depth loop (docs/method.md §1)."""

  out_BxTxD: Array
  aux_loss: Array | float = 0.0  # scalar added to the training objective; it receives gradients
  side: PyTree = None  # side outputs without gradient: new keys and values when decoding, expert loads


# f_l(layer_inputs, consts, h_BxTxD) -> SublayerOutput: one sublayer with its own pre-norm. `layer_inputs`
# is one layer's slice of its group's stacked inputs (parameters, and the KV cache when decoding);
# `consts` are inputs shared by every layer, such as RoPE tables.
SublayerFn = Callable[[PyTree, PyTree, Array], SublayerOutput]


class LayerGroup(NamedTuple):
  """Consecutive layers sharing their `K` sublayer functions; `inputs` stacked `[layers, ...]`."""

  sublayers: tuple[SublayerFn, ...]
  inputs: PyTree


class LoopOutput(NamedTuple):
  """A depth loop's result: the final state (AttnRes `DepthState`, or the residual stream), the sum of all
  auxiliary losses, the side outputs (per group, per sublayer kind, stacked over the group's layers) and the
  statistics (empty unless asked for)."""

  state: Any
  aux_loss: Array
  sides: tuple[tuple[PyTree, ...], ...]
  stats: dict[str, Array]


def aux_loss_of(output: SublayerOutput) -> Array:
  """The sublayer's auxiliary loss as a scalar in float32, or wider for wider outputs."""
  return jnp.asarray(output.aux_loss, jnp.promote_types(output.out_BxTxD.dtype, jnp.float32))


def differentiable(sublayer: SublayerFn) -> Callable:
  """The sublayer as `(inputs, consts, h) -> ((out, aux_loss), side)`, for `jax.vjp(..., has_aux=True)`."""
  def primal(layer_inputs, consts, h_BxTxD):
    output = sublayer(layer_inputs, consts, h_BxTxD)
    return (output.out_BxTxD, aux_loss_of(output)), output.side
  return primal


def group_sizes(group_inputs: tuple[PyTree, ...]) -> tuple[int, ...]:
  """Layers in each group: the leading axis of its stacked inputs."""
  return tuple(jax.tree.leaves(inputs)[0].shape[0] for inputs in group_inputs)


def layer_runs(segments: tuple[tuple[int, int, int], ...], sizes: tuple[int, ...]
               ) -> tuple[tuple[int, int, int, int], ...]:
  """Scan runs `(group, start, end, num_read)`: the `(start, end, num_read)` segments cut at group boundaries."""
  bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  return tuple((group, max(start, bounds[group]), min(end, bounds[group + 1]), num_read)
               for start, end, num_read in segments for group in range(len(sizes))
               if max(start, bounds[group]) < min(end, bounds[group + 1]))


def concatenate_layers(per_run: list[PyTree]) -> PyTree:
  """Per-layer outputs of consecutive scans, concatenated over layers (one scan's as they are)."""
  return per_run[0] if len(per_run) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *per_run)


def stacked_runs(per_run: list[tuple[int, PyTree]], num_groups: int) -> tuple[PyTree, ...]:
  """`(group, outputs)` of every scan -> per group, its scans' outputs concatenated over layers."""
  return tuple(concatenate_layers([ys for group, ys in per_run if group == g]) for g in range(num_groups))


def rms(x: Array) -> Array:
  """Root mean square over all elements, in float32 (for the analysis statistics)."""
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def stack_sublayers(per_sublayer: tuple[Array, ...]) -> Array:
  """K scanned statistics `[num_layers, ...]` (one per sublayer kind) -> `[L, ...]` in sublayer order."""
  return jnp.stack(per_sublayer, axis=1).reshape((-1,) + per_sublayer[0].shape[1:])


STAT_NAMES = ("input_rms", "output_rms", "depth_weights")


def flatten_stats(per_run: list[list[tuple[Array, ...]]]) -> dict[str, Array]:
  """Per scan, per sublayer kind, a tuple of statistics `[layers, ...]` -> each statistic `[L, ...]`."""
  per_kind = [concatenate_layers([run[k] for run in per_run]) for k in range(len(per_run[0]))]
  return {name: stack_sublayers(values) for name, values in zip(STAT_NAMES, zip(*per_kind))}
