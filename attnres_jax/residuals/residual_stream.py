"""Residual-stream depth loops, scanned over stacked layers: the PreNorm baseline `h <- h + f_l(h)`,
and mHC's `m` streams (`hyper_connections.py`) for the baselines of docs/method.md §8."""

import jax
import jax.numpy as jnp

from attnres_jax.residuals.hyper_connections import HyperParams, StreamMixing, coefficients, read, write
from attnres_jax.residuals.remat import checkpointed
from attnres_jax.residuals.types import Array, PyTree, SublayerFn, rms, stack_sublayers


def stream_loop(
    sublayers: tuple[SublayerFn, ...],
    layer_params: PyTree,
    consts: PyTree,
    embedding_BxTxD: Array,
    *,
    remat: str,
    collect_stats: bool = False,
    mixing: StreamMixing | None = None,
    hyper_params: HyperParams | None = None,
    eps: float = 1e-6,
    unroll: bool = False,
) -> tuple[Array, dict[str, Array], tuple[PyTree, ...]]:
  """Runs every layer's sublayers on one residual stream, or on `mixing.streams` hyper-connected ones.

  `hyper_params` are mHC's parameters stacked `[L_b, K, ...]` (with `mixing`;
  `eps` is its stream norm's); `unroll` unrolls the layer scan (for the TPU
  compiler's cost analysis, which counts a scan body once). Returns the final stream (mHC: the streams'
  mean), if `collect_stats` the RMS of every sublayer's input and output
  (`input_rms`, `output_rms`, each `[L]` in sublayer order), and the
  sublayers' auxiliary outputs stacked over layers.
  """

  def layer(x, xs):
    params, hyper_K = xs
    stats, auxes = [], []
    for k, sublayer in enumerate(sublayers):
      if mixing is None:
        h_BxTxD = x
      else:
        mix = coefficients(jax.tree.map(lambda p: p[k], hyper_K), x, mixing, eps)
        h_BxTxD = read(mix, x)
      out_BxTxD, aux = sublayer(params, consts, h_BxTxD)
      auxes.append(aux)
      if collect_stats:
        stats.append((rms(h_BxTxD), rms(out_BxTxD)))
      x = x + out_BxTxD if mixing is None else write(mix, x, out_BxTxD)
    return x, (stats, tuple(auxes))

  x = (embedding_BxTxD if mixing is None
       else jnp.broadcast_to(embedding_BxTxD, (mixing.streams,) + embedding_BxTxD.shape))
  x, (stats, auxes) = jax.lax.scan(checkpointed(layer, remat), x, (layer_params, hyper_params), unroll=unroll)
  h_BxTxD = x if mixing is None else jnp.mean(x, axis=0)
  if not collect_stats:
    return h_BxTxD, {}, auxes
  input_rms, output_rms = zip(*stats)
  return h_BxTxD, {"input_rms": stack_sublayers(input_rms), "output_rms": stack_sublayers(output_rms)}, auxes
