"""Ablation variants of the depth-mixing rule (`attnres-spec.md` section 7, Table 4).

`MixingRule()` is the spec's rule (sections 2-4): key RMSNorm, one softmax over
the visible sources. The variants change one thing each:
- `key_norm=False`: keys are the raw sources, `k_i = v_i`;
- `normalization="sigmoid"`: weights `sigmoid(s_i)`, not normalised over sources;
- `num_heads=H`: a separate depth softmax per channel group of `d / H`;
- `window=W` (Full AttnRes): the last `W` outputs plus the embedding.
The default rule runs through the batched op (`attnres_jax.kernels`); the
variants through `mix_sources` in jnp, on the same scanned loop.
"""

import dataclasses

import jax
import jax.numpy as jnp

from attnres_jax.kernels.depth_attention_reference import compute_dtype, inverse_rms

Array = jax.Array
NORMALIZATIONS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class MixingRule:
  key_norm: bool = True
  normalization: str = "softmax"
  num_heads: int = 1
  window: int = 0  # 0: every source

  @property
  def is_default(self) -> bool:
    return self == MixingRule()


def visible_sources(rule: MixingRule, num_slots: int, num_visible: Array, partial_visible: Array | bool) -> Array:
  """`[N + 1]` bool over (slots, partial): slots below `num_visible` and the partial if visible, cut to the window.

  The window keeps the `W` newest outputs (the partial, if visible, is the
  newest) and always slot 0, the embedding.
  """
  index_S = jnp.arange(num_slots + 1)
  is_partial_S = index_S == num_slots
  visible_S = (index_S < num_visible) | (is_partial_S & partial_visible)
  if rule.window:
    age_S = jnp.where(is_partial_S, 0, num_visible - 1 - index_S + jnp.asarray(partial_visible, jnp.int32))
    visible_S &= (index_S == 0) | (age_S < rule.window)
  return visible_S


def source_weights(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain_D: Array,
                   eps: float) -> Array:
  """Weights `[S, B, T, H]` of every source for each head (hidden sources: 0)."""
  dtype = compute_dtype(sources_SxBxTxD.dtype)
  heads, width = rule.num_heads, sources_SxBxTxD.shape[-1]
  keys = sources_SxBxTxD.astype(dtype)
  if rule.key_norm:
    keys = keys * inverse_rms(sources_SxBxTxD, eps)[..., None]
  keys_SxBxTxHxC = keys.reshape(keys.shape[:-1] + (heads, width // heads))
  query_HxC = query_gain_D.astype(dtype).reshape(heads, width // heads)
  logits_SxBxTxH = jnp.einsum("sbthc,hc->sbth", keys_SxBxTxHxC, query_HxC, precision=jax.lax.Precision.HIGHEST)
  visible = visible_S.reshape(-1, 1, 1, 1)
  if rule.normalization == "sigmoid":
    return jnp.where(visible, jax.nn.sigmoid(logits_SxBxTxH), 0.0)
  return jax.nn.softmax(jnp.where(visible, logits_SxBxTxH, -jnp.inf), axis=0)


def mix_sources(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain_D: Array,
                eps: float) -> Array:
  """`h = sum_i weight_i v_i` per head's channel group, in the sources' dtype."""
  weights_SxBxTxH = source_weights(rule, sources_SxBxTxD, visible_S, query_gain_D, eps)
  shape = sources_SxBxTxD.shape
  grouped = sources_SxBxTxD.astype(weights_SxBxTxH.dtype).reshape(shape[:-1] + (rule.num_heads, -1))
  h_BxTxHxC = jnp.einsum("sbth,sbthc->bthc", weights_SxBxTxH, grouped, precision=jax.lax.Precision.HIGHEST)
  return h_BxTxHxC.reshape(shape[1:]).astype(sources_SxBxTxD.dtype)
