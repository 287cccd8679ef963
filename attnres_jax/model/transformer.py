"""Decoder-only LM whose depth mixing is PreNorm, Full AttnRes, Block AttnRes or mHC.

docs/method.md §1: each transformer layer is two AttnRes sublayers
(attention, then MLP), each keeping its own pre-norm. Layer parameters are
stacked along a leading `layers` axis and run by a scan (`residuals/`); the
pseudo-queries live in `DepthQueries`, zero-initialised (docs/method.md §2; the
§8 ablations change them, e.g. DenseFormer's weights start at 1), with
the output query applied before the final norm (docs/method.md §5). mHC's stream
parameters (docs/method.md §8, §12.9) live in `HyperConnections`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from attnres_jax import axes
from attnres_jax.config_checks import check_model_config
from attnres_jax.model.kv_cache import KVCache, empty_cache, plan_write, write
from attnres_jax.model.layers import TOKEN_ACTIVATIONS, Attention, RMSNorm, SwiGLU, logical_param, normal_param, rope_tables
from attnres_jax.residuals.depth_loop import DepthParams, attnres_loop, output_mix
from attnres_jax.residuals.hyper_connections import INITIAL_GATE, HyperParams, StreamMixing, initial_bias
from attnres_jax.residuals.mixing_rules import MixingRule
from attnres_jax.residuals.residual_stream import stream_loop
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.sharding import constrain

Array = jax.Array
SUBLAYER_MODULES = (("attention_norm", "attention"), ("mlp_norm", "mlp"))  # each sublayer's TransformerLayer fields
SUBLAYERS_PER_LAYER = len(SUBLAYER_MODULES)


def head_dim(config: ml_collections.ConfigDict) -> int:
  """`config.head_dim`, or `d_model / num_heads` where it is 0."""
  return config.head_dim or config.d_model // config.num_heads


class TransformerLayer(nnx.Module):
  """One attention sublayer and one MLP sublayer, each with its own pre-norm."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    out_std = config.init_std / (2 * config.num_layers) ** 0.5
    dims = dict(init_std=config.init_std, out_std=out_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.attention = Attention(config.d_model, config.num_heads, config.num_kv_heads, head_dim(config),
                               attention_impl=config.attention_impl, **dims)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.mlp = SwiGLU(config.d_model, config.d_ff, **dims)

  def attention_sublayer(self, rope: tuple[Array, Array], h_BxTxD: Array, cache=None, plan=None,
                         segment_ids_BxT: Array | None = None):
    return self.attention(self.attention_norm(h_BxTxD), rope, cache, plan, segment_ids_BxT)

  def mlp_sublayer(self, h_BxTxD: Array) -> Array:
    return self.mlp(self.mlp_norm(h_BxTxD))


# The sublayer functions of the depth loops (`residuals/types.py`): layer inputs are (parameters,
# this layer's KV cache or None), consts are (RoPE tables, `CacheWrite` or None, segment ids `[B, T]` or None).
def _attention_sublayer(graphdef, layer_inputs, consts, h_BxTxD):
  (params, cache), (rope, plan, segment_ids_BxT) = layer_inputs, consts
  out_BxTxD, new_keys_values = nnx.merge(graphdef, params).attention_sublayer(rope, h_BxTxD, cache, plan,
                                                                               segment_ids_BxT)
  return out_BxTxD, (None if cache is None else new_keys_values)


def _mlp_sublayer(graphdef, layer_inputs, consts, h_BxTxD):
  del consts
  return nnx.merge(graphdef, layer_inputs[0]).mlp_sublayer(h_BxTxD), None


class DepthQueries(nnx.Module):
  """Pseudo-queries `w_l` and key-norm gains `g_l` of every sublayer, and of the output.

  Queries start at zero (docs/method.md §2), so training starts from the uniform
  average of the sources; gains start at one and can be dropped
  (`key_norm_gain=False`: a weightless key norm). Ablations (`mixing_rules.py`):
  learned logits make each query a row of `N + 1` logits (DenseFormer's raw
  weights, starting at 1) without gains; the input-dependent query adds a
  zero-initialised projection `W_l` `[d, d]` per sublayer.
  """

  def __init__(self, num_layers: int, d_model: int, num_slots: int, rule: MixingRule, *, key_norm_gain: bool,
               param_dtype):
    width = num_slots + 1 if rule.logits == "learned" else d_model
    shape = (num_layers, SUBLAYERS_PER_LAYER, width)
    names = (axes.LAYERS, axes.SUBLAYER, axes.DEPTH_EMBED)
    self.pseudo_query = logical_param(jnp.full(shape, rule.initial_query, param_dtype), names)
    self.output_query = logical_param(jnp.full((width,), rule.initial_query, param_dtype), (axes.DEPTH_EMBED,))
    has_gains = key_norm_gain and rule.logits == "content"
    self.key_gain = logical_param(jnp.ones(shape, param_dtype), names) if has_gains else None
    self.output_key_gain = (logical_param(jnp.ones((width,), param_dtype), (axes.DEPTH_EMBED,))
                            if has_gains else None)
    self.query_projection = (logical_param(
        jnp.zeros((num_layers, SUBLAYERS_PER_LAYER, d_model, d_model), param_dtype),
        (axes.LAYERS, axes.SUBLAYER, axes.EMBED, axes.DEPTH_EMBED)) if rule.query_projection else None)

  def gains(self) -> tuple[Array, Array]:
    """(sublayer gains `[L_b, 2, d]`, output gain `[d]`); ones for a weightless norm."""
    if self.key_gain is None:
      return jnp.ones_like(self.pseudo_query[...]), jnp.ones_like(self.output_query[...])
    return self.key_gain[...], self.output_key_gain[...]

  def sublayer_params(self) -> DepthParams:
    """Every sublayer's depth-mixing parameters, stacked `[L_b, 2, ...]`."""
    projection = None if self.query_projection is None else self.query_projection[...]
    return DepthParams(self.pseudo_query[...], self.gains()[0], projection)


class HyperConnections(nnx.Module):
  """mHC's per-sublayer stream projections, gates and biases (`hyper_connections.py`), stacked `[L_b, 2, ...]`."""

  def __init__(self, num_layers: int, d_model: int, mixing: StreamMixing, *, init_std: float, param_dtype,
               rngs: nnx.Rngs):
    stacked = (num_layers, SUBLAYERS_PER_LAYER)
    self.stream_projection = normal_param(rngs, stacked + (mixing.streams * d_model, mixing.width), init_std,
                                          (axes.LAYERS, axes.SUBLAYER, axes.EMBED, None), param_dtype)
    self.stream_gates = logical_param(jnp.full(stacked + (3,), INITIAL_GATE, param_dtype),
                                      (axes.LAYERS, axes.SUBLAYER, None))
    bias = initial_bias(mixing, num_layers * SUBLAYERS_PER_LAYER).reshape(stacked + (mixing.width,))
    self.stream_bias = logical_param(jnp.asarray(bias, param_dtype), (axes.LAYERS, axes.SUBLAYER, None))

  def params(self) -> HyperParams:
    return HyperParams(self.stream_projection[...], self.stream_gates[...], self.stream_bias[...])


class Transformer(nnx.Module):
  """Decoder-only LM built from `config.model` (see `configs/base.py` for the fields)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    check_model_config(config)
    self.residual = config.residual
    self.num_layers = config.num_layers
    self.block_size = config.block_size if config.residual == "block" else 1
    self.head_dim = head_dim(config)
    self.rope_theta = config.rope_theta
    self.norm_eps = config.norm_eps
    self.remat = config.remat
    self.depth_attention_impl = config.depth_attention_impl
    self.two_phase = config.two_phase
    self.unroll_layers = config.unroll_layers
    self.depth_scan_segments = config.depth_scan_segments
    self.mixing_rule = MixingRule(key_norm=config.depth_key_norm, normalization=config.depth_normalization,
                                  num_heads=config.depth_heads, window=config.depth_window,
                                  logits=config.depth_logits, query_projection=config.depth_query_projection)
    self.dtype = jnp.dtype(config.dtype)
    param_dtype = jnp.dtype(config.param_dtype)
    self.embedding = normal_param(rngs, (config.vocab_size, config.d_model), config.embed_init_std,
                                  (axes.VOCAB, axes.EMBED), param_dtype)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def make_layers(rngs: nnx.Rngs) -> TransformerLayer:
      return TransformerLayer(config, rngs=rngs)

    self.layers = make_layers(rngs)
    self.stream_mixing = (StreamMixing(config.mhc_streams, config.mhc_residual_mixing, config.mhc_sinkhorn_iters)
                          if config.residual == "mhc" else None)
    self.depth = (None if config.residual in ("prenorm", "mhc") else DepthQueries(
        config.num_layers, config.d_model, self.schedule().num_slots, self.mixing_rule,
        key_norm_gain=config.key_norm_gain, param_dtype=param_dtype))
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.head = (None if config.tie_embeddings else normal_param(
        rngs, (config.d_model, config.vocab_size), config.init_std, (axes.EMBED, axes.VOCAB), param_dtype))
    self.hyper = (None if self.stream_mixing is None else HyperConnections(
        config.num_layers, config.d_model, self.stream_mixing, init_std=config.init_std, param_dtype=param_dtype,
        rngs=rngs))

  @property
  def num_sublayers(self) -> int:
    return SUBLAYERS_PER_LAYER * self.num_layers

  def schedule(self) -> BlockSchedule:
    return BlockSchedule(self.num_layers, SUBLAYERS_PER_LAYER, self.block_size)

  def __call__(self, tokens_BxT: Array, *, segment_ids_BxT: Array | None = None, return_stats: bool = False):
    """Logits `[B, T, vocab]` in float32 (or wider); with `return_stats`, also a dict of

    per-sublayer `input_rms`, `output_rms` `[L]` and, for AttnRes, the
    token-averaged `depth_weights` `[L, N + 1]` over (b_0..b_{N-1}, partial)
    and `output_depth_weights` `[N + 1]`. With `segment_ids_BxT` (integers),
    tokens attend only to earlier tokens of their own segment (document
    masking, docs/method.md §14; `train.loss.document_segment_ids`).
    """
    if not return_stats:
      return self.logits(self.hidden(tokens_BxT, segment_ids_BxT=segment_ids_BxT))
    h_BxTxD, stats = self.hidden(tokens_BxT, segment_ids_BxT=segment_ids_BxT, return_stats=True)
    return self.logits(h_BxTxD), stats

  def hidden(self, tokens_BxT: Array, *, segment_ids_BxT: Array | None = None, return_stats: bool = False):
    """The final-normed hidden states `[B, T, d]` that the LM head reads (the chunked loss's input);
    `segment_ids_BxT` and, with `return_stats`, the statistics as in `__call__`."""
    h_BxTxD, stats, _ = self._forward(tokens_BxT, jnp.arange(tokens_BxT.shape[1]), None, None, segment_ids_BxT,
                                      return_stats)
    return (h_BxTxD, stats) if return_stats else h_BxTxD

  def logits(self, h_BxTxD: Array) -> Array:
    """LM-head logits `[B, T, vocab]` of final-normed hidden states, in float32 (or wider)."""
    head_DxV = self.embedding[...].T if self.head is None else self.head[...]
    logits_BxTxV = jnp.einsum("btd,dv->btv", h_BxTxD, head_DxV.astype(self.dtype),
                              preferred_element_type=jnp.promote_types(self.dtype, jnp.float32))
    return constrain(logits_BxTxV, (axes.BATCH, axes.ACTIVATION_LENGTH, axes.ACTIVATION_VOCAB))

  def empty_cache(self, batch: int, window: int) -> KVCache:
    """A KV cache for `batch` sequences attending to their last `window` positions (`kv_cache.py`)."""
    keys = self.layers.attention.key
    return empty_cache(self.num_layers, batch, window, keys.shape[2], self.head_dim, self.dtype)

  def extend(self, tokens_BxT: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Logits `[B, T, vocab]` of `T` tokens appended to `cache`, and the cache holding them.

    Decoding (`T = 1`) or prefill (an empty cache, `T <= window`). Each token
    flows through the depth loop as in `__call__`; only keys and values come
    from the cache (see `kv_cache.py` for why AttnRes needs nothing more).
    """
    positions_T, plan, positions_W = plan_write(cache, tokens_BxT.shape[1])
    layer_cache = (cache.key_LxBxWxKxH, cache.value_LxBxWxKxH)
    h_BxTxD, _, new_keys_values = self._forward(tokens_BxT, positions_T, layer_cache, plan, None, False)
    return self.logits(h_BxTxD), write(cache, plan, positions_W, *new_keys_values)

  def _forward(self, tokens_BxT, positions_T, layer_cache, plan, segment_ids_BxT, return_stats):
    """Final-normed hidden states, statistics and the attention sublayers' new keys and values
    `[L_b, B, T, K, H]` (or None)."""
    x_BxTxD = constrain(jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype), TOKEN_ACTIVATIONS)
    consts = (rope_tables(positions_T, self.head_dim, self.rope_theta), plan, segment_ids_BxT)
    graphdef, layer_params = nnx.split(self.layers)
    layer_inputs = (layer_params, layer_cache)
    sublayers = (functools.partial(_attention_sublayer, graphdef), functools.partial(_mlp_sublayer, graphdef))
    if self.depth is None:
      h_BxTxD, stats, auxes = stream_loop(
          sublayers, layer_inputs, consts, x_BxTxD, remat=self.remat, collect_stats=return_stats,
          unroll=self.unroll_layers,
          mixing=self.stream_mixing, hyper_params=None if self.hyper is None else self.hyper.params(),
          eps=self.norm_eps)
    else:
      _, output_gain = self.depth.gains()
      state, stats, auxes = attnres_loop(
          sublayers, self.schedule(), self.remat, self.norm_eps, self.depth_attention_impl, self.mixing_rule,
          self.two_phase, return_stats, layer_inputs, self.depth.sublayer_params(), x_BxTxD, consts,
          unroll=self.unroll_layers, segments=self.depth_scan_segments)
      h_BxTxD, output_weights = output_mix(state, self.depth.output_query[...], output_gain, self.norm_eps,
                                           self.depth_attention_impl, self.mixing_rule, with_weights=return_stats)
      if return_stats:
        stats["output_depth_weights"] = output_weights
    return self.final_norm(h_BxTxD), stats, auxes[0]
