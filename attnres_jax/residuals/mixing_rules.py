"""Depth-mixing rules: how one query weighs the visible sources (docs/method.md §2, §8, Table 4).

A rule is a small frozen dataclass registered in `RULES` under the value of
`config.model.depth_logits` that selects it (`from_config` reads its options).
It declares what it needs (the
width of its query, whether it has key gains or a query projection, the
query's initial value) and whether the batched op of `attnres_jax.kernels`
computes it (`fused`: the Pallas kernel, two-phase and the log-sum-exp merge
apply); other rules mix in jnp (`mix_sources`) on the same scanned loop.

- `ContentLogits()`: the paper's rule, logits `w_l . RMSNorm(v_i)`, softmax over
  the sources. Its ablations: `key_norm=False` (`k_i = v_i`), `num_heads=H` (a
  separate softmax per channel group of `d / H`), `query_projection=True` (the
  input-dependent query `q_l = w_l + W_l h`, `h` the newest source; with
  `query_norm=True` our normalised variant `q_l = w_l + W_l RMSNorm(h)`),
  `normalization="sigmoid"` (weights `sigmoid(s_i)`, not normalised).
- `LearnedLogits()`: input-independent mixing, one learned logit per (sublayer,
  source); with `normalization="none"` DenseFormer's static weights
  `h_l = sum_i a_li v_i`, starting at 1 (the PreNorm sum).
Either may keep only a `window` of the newest sources (and always the embedding).

Contract (docs/method.md §7): a source that is not visible gets exactly zero
weight, and the mixture has exactly zero gradient with respect to its value.
The backward pass replays every sublayer against the final buffer, whose
slots not yet sealed at that sublayer hold later values; the contract makes
the replay exact. `tests/test_mixing_rules.py` checks it for every registered
rule.
"""

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attnres_jax.kernels.depth_attention_reference import compute_dtype, inverse_rms

Array = jax.Array
NORMALIZATIONS = ("softmax", "sigmoid", "none")


def normalized_weights(normalization: str, logits_SxBxTxH: Array, visible_S: Array) -> Array:
  """Weights of the sources from their logits: softmax over the visible ones, sigmoid, or the raw logits."""
  visible = visible_S.reshape(-1, 1, 1, 1)
  if normalization == "sigmoid":
    return jnp.where(visible, jax.nn.sigmoid(logits_SxBxTxH), 0.0)
  if normalization == "none":
    return jnp.where(visible, logits_SxBxTxH, 0.0)
  return jax.nn.softmax(jnp.where(visible, logits_SxBxTxH, -jnp.inf), axis=0)


@dataclasses.dataclass(frozen=True)
class MixingRule(abc.ABC):
  """One depth-mixing rule; subclasses say how logits are formed (see the module docstring for the contract)."""

  normalization: str = "softmax"
  window: int = 0  # 0: every source; W: the W newest and the embedding (Full AttnRes)

  config_name: ClassVar[str]  # the value of config.model.depth_logits that selects the rule

  @classmethod
  def from_config(cls, model: Mapping[str, Any]) -> "MixingRule":
    """The rule with the options `config.model`'s `depth_*` fields give it."""
    return cls(normalization=model["depth_normalization"], window=model["depth_window"])

  @property
  def fused(self) -> bool:
    """Whether the batched op (jnp reference or Pallas kernel, two-phase, log-sum-exp merge) computes it."""
    return False

  @property
  def has_key_gain(self) -> bool:
    return False

  @property
  def has_query_projection(self) -> bool:
    return False

  @property
  def initial_query(self) -> float:
    """Init of queries / learned logits: 0 (uniform weights), or 1 for raw weights (DenseFormer = PreNorm)."""
    return 1.0 if self.normalization == "none" else 0.0

  @abc.abstractmethod
  def query_width(self, d_model: int, num_slots: int) -> int:
    """Entries of one sublayer's query parameter."""

  def sublayer_query(self, query: Array, projection: Array | None, newest_BxTxD: Array, eps: float) -> Array:
    """The query a sublayer mixes with, given its parameters and the newest source."""
    del projection, newest_BxTxD, eps
    return query

  def column_query(self, query: Array, partial_column: Array | None) -> Array:
    """The query when the open partial sum is about to be sealed into slot `partial_column` (None: it is not)."""
    del partial_column
    return query

  @abc.abstractmethod
  def logits(self, sources_SxBxTxD: Array, query_gain: Array, eps: float) -> Array:
    """`[S, B, T, H]` logits of the sources (`query_gain`: the query with any key gain folded in)."""

  def visible(self, num_slots: int, num_visible: Array, partial_visible: Array | bool) -> Array:
    """`[N + 1]` bool over (slots, partial): slots below `num_visible` and the partial if visible, cut to the window.

    The window keeps the `W` newest outputs (the partial, if visible, is the
    newest) and always slot 0, the embedding.
    """
    index_S = jnp.arange(num_slots + 1)
    is_partial_S = index_S == num_slots
    visible_S = (index_S < num_visible) | (is_partial_S & partial_visible)
    if self.window:
      age_S = jnp.where(is_partial_S, 0, num_visible - 1 - index_S + jnp.asarray(partial_visible, jnp.int32))
      visible_S &= (index_S == 0) | (age_S < self.window)
    return visible_S


@dataclasses.dataclass(frozen=True)
class ContentLogits(MixingRule):
  """Logits `q . k_i` of the query against (by default RMS-normalised) source keys, per channel group."""

  key_norm: bool = True
  num_heads: int = 1
  query_projection: bool = False
  query_norm: bool = False  # the projection reads RMSNorm(h) (no gain) instead of h (docs/method.md §12.4)

  config_name: ClassVar[str] = "content"

  @classmethod
  def from_config(cls, model: Mapping[str, Any]) -> "ContentLogits":
    return cls(normalization=model["depth_normalization"], window=model["depth_window"],
               key_norm=model["depth_key_norm"], num_heads=model["depth_heads"],
               query_projection=model["depth_query_projection"], query_norm=model["depth_query_norm"])

  @property
  def fused(self) -> bool:
    return self == ContentLogits()

  @property
  def has_key_gain(self) -> bool:
    return True

  @property
  def has_query_projection(self) -> bool:
    return self.query_projection

  def query_width(self, d_model: int, num_slots: int) -> int:
    return d_model

  def sublayer_query(self, query: Array, projection: Array | None, newest_BxTxD: Array, eps: float) -> Array:
    """`w_l`, or the input-dependent `w_l + W_l h` `[B, T, d]`, `h` RMS-normalised with `query_norm`
    (docs/method.md §8, §12.4)."""
    if projection is None:
      return query
    dtype = compute_dtype(newest_BxTxD.dtype)
    newest = newest_BxTxD.astype(dtype)
    if self.query_norm:
      newest = newest * inverse_rms(newest_BxTxD, eps)[..., None]
    return query.astype(dtype) + jnp.einsum("btd,de->bte", newest, projection.astype(dtype),
                                            precision=jax.lax.Precision.HIGHEST)

  def logits(self, sources_SxBxTxD: Array, query_gain: Array, eps: float) -> Array:
    """`query_gain` is `[d]` or per token `[B, T, d]`."""
    _, batch, length, width = sources_SxBxTxD.shape
    dtype = compute_dtype(sources_SxBxTxD.dtype)
    heads = self.num_heads
    keys = sources_SxBxTxD.astype(dtype)
    if self.key_norm:
      keys = keys * inverse_rms(sources_SxBxTxD, eps)[..., None]
    keys_SxBxTxHxC = keys.reshape(keys.shape[:-1] + (heads, width // heads))
    query_BxTxHxC = jnp.broadcast_to(query_gain.astype(dtype).reshape(query_gain.shape[:-1] + (heads, -1)),
                                     (batch, length, heads, width // heads))
    return jnp.einsum("sbthc,bthc->sbth", keys_SxBxTxHxC, query_BxTxHxC, precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class LearnedLogits(MixingRule):
  """Input-independent mixing: the sublayer's query is a row of `N + 1` logits, one per slot and the partial.

  Logits are indexed by slot (docs/method.md §12.5): the open partial sum takes
  column `N`, or, when it is about to be sealed into slot `j`, column `j`.
  """

  config_name: ClassVar[str] = "learned"

  def query_width(self, d_model: int, num_slots: int) -> int:
    return num_slots + 1

  def column_query(self, query: Array, partial_column: Array | None) -> Array:
    return query if partial_column is None else query.at[-1].set(query[partial_column])

  def logits(self, sources_SxBxTxD: Array, query_gain: Array, eps: float) -> Array:
    num_sources, batch, length, _ = sources_SxBxTxD.shape
    return jnp.broadcast_to(query_gain.reshape(num_sources, 1, 1, 1), (num_sources, batch, length, 1))


RULES: dict[str, type[MixingRule]] = {rule.config_name: rule for rule in (ContentLogits, LearnedLogits)}
LOGITS = tuple(RULES)


def rule_from_config(model: Mapping[str, Any]) -> MixingRule:
  """The rule that `config.model`'s `depth_*` fields select (`depth_logits` names it in `RULES`)."""
  return RULES[model["depth_logits"]].from_config(model)


def source_weights(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain: Array,
                   eps: float) -> Array:
  """Weights `[S, B, T, H]` of every source for each head (hidden sources: 0)."""
  return normalized_weights(rule.normalization, rule.logits(sources_SxBxTxD, query_gain, eps), visible_S)


def mix_sources(rule: MixingRule, sources_SxBxTxD: Array, visible_S: Array, query_gain: Array,
                eps: float) -> Array:
  """`h = sum_i weight_i v_i` per head's channel group, in the sources' dtype."""
  weights_SxBxTxH = source_weights(rule, sources_SxBxTxD, visible_S, query_gain, eps)
  shape = sources_SxBxTxD.shape
  grouped = sources_SxBxTxD.astype(weights_SxBxTxH.dtype).reshape(shape[:-1] + (weights_SxBxTxH.shape[-1], -1))
  h_BxTxHxC = jnp.einsum("sbth,sbthc->bthc", weights_SxBxTxH, grouped, precision=jax.lax.Precision.HIGHEST)
  return h_BxTxHxC.reshape(shape[1:]).astype(sources_SxBxTxD.dtype)
