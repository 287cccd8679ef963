"""Residual-stream depth loops, scanned over stacked layers: the PreNorm baseline `h <- h + f_l(h)`,
and mHC's `m` streams (`hyper_connections.py`) for the baselines of docs/method.md §8."""

import jax
import jax.numpy as jnp

from attnres_jax.residuals.hyper_connections import HyperParams, StreamMixing, coefficients, read, write
from attnres_jax.residuals.remat import checkpointed
from attnres_jax.residuals.types import (Array, LayerGroup, LoopOutput, PyTree, SublayerFn, aux_loss_of,
                                         flatten_stats, group_sizes, rms)


def _layer(x, xs, *, sublayers: tuple[SublayerFn, ...], consts: PyTree, mixing: StreamMixing | None, eps: float,
           collect_stats: bool):
  """One layer's sublayers on the stream (or, with `mixing`, read from and written to the hyper-connected ones)."""
  params, hyper_K = xs
  stats, aux_losses, sides = [], [], []
  for k, sublayer in enumerate(sublayers):
    if mixing is None:
      h_BxTxD = x
    else:
      mix = coefficients(jax.tree.map(lambda p: p[k], hyper_K), x, mixing, eps)
      h_BxTxD = read(mix, x)
    output = sublayer(params, consts, h_BxTxD)
    aux_losses.append(aux_loss_of(output))
    sides.append(jax.lax.stop_gradient(output.side))  # as in attnres_loop: side outputs carry no gradient
    if collect_stats:
      stats.append(jax.lax.stop_gradient((rms(h_BxTxD), rms(output.out_BxTxD))))
    x = x + output.out_BxTxD if mixing is None else write(mix, x, output.out_BxTxD)
  return x, (sum(aux_losses), tuple(sides), stats)


def stream_loop(
    groups: tuple[LayerGroup, ...],
    consts: PyTree,
    embedding_BxTxD: Array,
    *,
    remat: str,
    collect_stats: bool = False,
    mixing: StreamMixing | None = None,
    hyper_params: HyperParams | None = None,
    eps: float = 1e-6,
    unroll: bool = False,
) -> LoopOutput:
  """Runs every layer's sublayers on one residual stream, or on `mixing.streams` hyper-connected ones.

  `groups` as for `attnres_loop`; `hyper_params` are mHC's parameters stacked
  `[L_b, K, ...]` (with `mixing`; `eps` is its stream norm's); `unroll` unrolls
  the layer scans (for the TPU compiler's cost analysis, which counts a scan
  body once). The state of the output is the final stream (mHC: the streams'
  mean); its statistics, if `collect_stats`, the RMS of every sublayer's input
  and output (`input_rms`, `output_rms`, each `[L]` in sublayer order).
  """
  x = (embedding_BxTxD if mixing is None
       else jnp.broadcast_to(embedding_BxTxD, (mixing.streams,) + embedding_BxTxD.shape))
  start, per_group = 0, []
  for group, size in zip(groups, group_sizes(tuple(group.inputs for group in groups))):
    layer = lambda x, xs, group=group: _layer(x, xs, sublayers=group.sublayers, consts=consts, mixing=mixing,
                                              eps=eps, collect_stats=collect_stats)
    hyper = jax.tree.map(lambda p: p[start:start + size], hyper_params)
    x, ys = jax.lax.scan(checkpointed(layer, remat), x, (group.inputs, hyper), unroll=unroll)
    per_group.append(ys)
    start += size
  h_BxTxD = x if mixing is None else jnp.mean(x, axis=0)
  aux_loss = sum(jnp.sum(aux) for aux, _, _ in per_group)
  stats = flatten_stats([stats for _, _, stats in per_group]) if collect_stats else {}
  return LoopOutput(h_BxTxD, aux_loss, tuple(sides for _, sides, _ in per_group), stats)
