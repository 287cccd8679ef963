"""The PreNorm baseline depth loop: `h <- h + f_l(h)`, scanned over stacked layers."""

import jax

from attnres_jax.residuals.remat import checkpointed
from attnres_jax.residuals.types import Array, PyTree, SublayerFn, rms, stack_sublayers


def prenorm_loop(
    sublayers: tuple[SublayerFn, ...],
    layer_params: PyTree,
    consts: PyTree,
    embedding_BxTxD: Array,
    *,
    remat: str,
    collect_stats: bool = False,
) -> tuple[Array, dict[str, Array], tuple[PyTree, ...]]:
  """Runs every layer's sublayers on one residual stream.

  Returns the final stream, if `collect_stats` the RMS of every sublayer's
  input and output (`input_rms`, `output_rms`, each `[L]` in sublayer order),
  and the sublayers' auxiliary outputs stacked over layers.
  """

  def layer(h_BxTxD, params):
    stats, auxes = [], []
    for sublayer in sublayers:
      out_BxTxD, aux = sublayer(params, consts, h_BxTxD)
      auxes.append(aux)
      if collect_stats:
        stats.append((rms(h_BxTxD), rms(out_BxTxD)))
      h_BxTxD = h_BxTxD + out_BxTxD
    return h_BxTxD, (stats, tuple(auxes))

  h_BxTxD, (stats, auxes) = jax.lax.scan(checkpointed(layer, remat), embedding_BxTxD, layer_params)
  if not collect_stats:
    return h_BxTxD, {}, auxes
  input_rms, output_rms = zip(*stats)
  return h_BxTxD, {"input_rms": stack_sublayers(input_rms), "output_rms": stack_sublayers(output_rms)}, auxes
