"""Ablation variants of the depth-mixing rule (docs/method.md §8, Table 4).

`MixingRule()` is the rule of docs/method.md §2-§4: key RMSNorm, one softmax over
the visible sources, logits `w_l . RMSNorm(v_i)`. The variants change one thing each:
- `key_norm=False`: keys are the raw sources, `k_i = v_i`;
- `normalization="sigmoid"`: weights `sigmoid(s_i)`, not normalised over sources;
- `num_heads=H`: a separate depth softmax per channel group of `d / H`;
- `window=W` (Full AttnRes): the last `W` outputs plus the embedding;
- `logits="learned"`: input-independent mixing, one learned logit per (sublayer,
  source); the sublayer's "query" is that row of `N + 1` logits;
- `logits="learned"`, `normalization="none"`: DenseFormer, static learned
  weights `h_l = sum_i a_li v_i`, starting at 1 (the PreNorm sum);
- `query_projection=True`: input-dependent query `q_l = w_l + W_l h`, `h` the
  newest source (the partial sum entering the sublayer; `v_{l-1}` in Full
  AttnRes), `W_l` a zero-initialised `d x d` projection.
The default rule runs through the batched op (`attnres_jax.kernels`); the
variants through `mix_sources` in jnp, on the same scanned loop.
"""

import dataclasses

import jax
import jax.numpy as jnp

from attnres_jax.kernels.depth_attention_reference import compute_dtype, inverse_rms

Array = jax.Array
NORMALIZATIONS = ("softmax", "sigmoid", "none")
LOGITS = ("content", "learned")


@dataclasses.dataclass(frozen=True)
class MixingRule:
  key_norm: bool = True
  normalization: str = "softmax"
  num_heads: int = 1
  window: int = 0  # 0: every source
  logits: str = "content"
  query_projection: bool = False

  @property
  def is_default(self) -> bool:
    return self == MixingRule()

  @property
  def initial_query(self) -> float:
    """Init of pseudo-queries / learned logits: 0 (uniform weights), or 1 for raw weights (DenseFormer = PreNorm)."""
    return 1.0 if self.normalization == "none" else 0.0


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


def _logits(rule: MixingRule, sources_SxBxTxD: Array, query_gain: Array, eps: float) -> Array:
  """`[S, B, T, H]` logits; `query_gain` is `[d]`, per token `[B, T, d]`, or learned logits `[S]`."""
  num_sources, batch, length, width = sources_SxBxTxD.shape
  if rule.logits == "learned":
    return jnp.broadcast_to(query_gain.reshape(num_sources, 1, 1, 1), (num_sources, batch, length, 1))
  dtype = compute_dtype(sources_SxBxTxD.dtype)
  heads = rule.num_heads
  keys = sources_SxBxTxD.astype(dtype)
  if rule.key_norm:
    keys = keys * inverse_rms(sources_SxBxTxD, eps)[..., None]
  keys_SxBxTxHxC = keys.reshape(keys.shape[:-1] + (heads, width // heads))
  query_BxTxHxC = jnp.broadcast_to(query_gain.astype(dtype).reshape(query_gain.shape[:-1] + (heads, -1)),
                                   (batch, length, heads, width // heads))
  return jnp.einsum("sbthc,bthc->sbth", keys_SxBxTxHxC, query_BxTxHxC, precision=jax.lax.Precision.HIGHEST)


def source_weights(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain: Array,
                   eps: float) -> Array:
  """Weights `[S, B, T, H]` of every source for each head (hidden sources: 0)."""
  logits_SxBxTxH = _logits(rule, sources_SxBxTxD, query_gain, eps)
  visible = visible_S.reshape(-1, 1, 1, 1)
  if rule.normalization == "sigmoid":
    return jnp.where(visible, jax.nn.sigmoid(logits_SxBxTxH), 0.0)
  if rule.normalization == "none":
    return jnp.where(visible, logits_SxBxTxH, 0.0)
  return jax.nn.softmax(jnp.where(visible, logits_SxBxTxH, -jnp.inf), axis=0)


def mix_sources(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain: Array,
                eps: float) -> Array:
  """`h = sum_i weight_i v_i` per head's channel group, in the sources' dtype."""
  weights_SxBxTxH = source_weights(rule, sources_SxBxTxD, visible_S, query_gain, eps)
  shape = sources_SxBxTxD.shape
  grouped = sources_SxBxTxD.astype(weights_SxBxTxH.dtype).reshape(shape[:-1] + (weights_SxBxTxH.shape[-1], -1))
  h_BxTxHxC = jnp.einsum("sbth,sbthc->bthc", weights_SxBxTxH, grouped, precision=jax.lax.Precision.HIGHEST)
  return h_BxTxHxC.reshape(shape[1:]).astype(sources_SxBxTxD.dtype)
