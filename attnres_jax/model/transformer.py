"""Decoder-only LM whose depth mixing is PreNorm, Full AttnRes, Block AttnRes or mHC.

docs/method.md §1: each transformer layer is two AttnRes sublayers
(attention, then the FFN: SwiGLU or Mixture-of-Experts, §16), each keeping its
own pre-norm. Layer parameters are stacked along a leading `layers` axis and
run by the depth loops' scans (`residuals/`), as one group of layers, or two
for an MoE model whose first `moe.dense_layers` stay dense; the
pseudo-queries live in `DepthQueries`, zero-initialised (docs/method.md §2; the
§8 ablations change them, e.g. DenseFormer's weights start at 1), with
the output query applied before the final norm (docs/method.md §5). mHC's stream
parameters (docs/method.md §8, §12.9) live in `HyperConnections`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from attnres_jax import axes
from attnres_jax.config_checks import check_model_config
from attnres_jax.model.kv_cache import KVCache, empty_cache, plan_write, write
from attnres_jax.model.layers import (TOKEN_ACTIVATIONS, Attention, RMSNorm, SwiGLU, logical_param, normal_param,
                                     rope_tables)
from attnres_jax.model.moe import MoE, MoEOutputs, spec_from_config, updated_expert_bias
from attnres_jax.residuals.depth_loop import LoopSpec, attnres_loop
from attnres_jax.residuals.depth_mixing import DepthParams, Mixing, output_mix
from attnres_jax.residuals.hyper_connections import INITIAL_GATE, HyperParams, StreamMixing, initial_bias
from attnres_jax.residuals.mixing_rules import MixingRule, rule_from_config
from attnres_jax.residuals.residual_stream import stream_loop
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.residuals.types import LayerGroup, SublayerOutput
from attnres_jax.sharding import constrain

Array = jax.Array
SUBLAYER_MODULES = (("attention_norm", "attention"), ("mlp_norm", "mlp"))  # each sublayer's TransformerLayer fields
SUBLAYERS_PER_LAYER = len(SUBLAYER_MODULES)


def head_dim(config: ml_collections.ConfigDict) -> int:
  """`config.head_dim`, or `d_model / num_heads` where it is 0."""
  return config.head_dim or config.d_model // config.num_heads


def dense_ffn_width(config: ml_collections.ConfigDict) -> int:
  """The SwiGLU width of a dense layer: `d_ff`, or an MoE model's `moe.dense_d_ff` where it is set."""
  return (config.moe.dense_d_ff or config.d_ff) if config.ffn == "moe" else config.d_ff


class TransformerLayer(nnx.Module):
  """One attention sublayer and one FFN sublayer (`ffn`: SwiGLU or MoE), each with its own pre-norm."""

  def __init__(self, config: ml_collections.ConfigDict, *, ffn: str, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    out_std = config.init_std / (2 * config.num_layers) ** 0.5
    dims = dict(init_std=config.init_std, out_std=out_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.attention = Attention(config.d_model, config.num_heads, config.num_kv_heads, head_dim(config),
                               attention_impl=config.attention_impl, **dims)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.mlp = (SwiGLU(config.d_model, dense_ffn_width(config), **dims) if ffn == "swiglu"
                else MoE(config.d_model, spec_from_config(config), **dims))

  def attention_sublayer(self, rope: tuple[Array, Array], h_BxTxD: Array, cache=None, plan=None,
                         segment_ids_BxT: Array | None = None):
    return self.attention(self.attention_norm(h_BxTxD), rope, cache, plan, segment_ids_BxT)

  def mlp_sublayer(self, h_BxTxD: Array) -> Array | tuple[Array, MoEOutputs]:
    """SwiGLU: the output; MoE: the output and its `MoEOutputs`."""
    return self.mlp(self.mlp_norm(h_BxTxD))


# The sublayer functions of the depth loops (`residuals/types.py`): layer inputs are (parameters,
# this layer's KV cache or None), consts are (RoPE tables, `CacheWrite` or None, segment ids `[B, T]` or None).
def _attention_sublayer(graphdef, layer_inputs, consts, h_BxTxD) -> SublayerOutput:
  (params, cache), (rope, plan, segment_ids_BxT) = layer_inputs, consts
  out_BxTxD, new_keys_values = nnx.merge(graphdef, params).attention_sublayer(rope, h_BxTxD, cache, plan,
                                                                               segment_ids_BxT)
  return SublayerOutput(out_BxTxD, side=None if cache is None else new_keys_values)


def _swiglu_sublayer(graphdef, layer_inputs, consts, h_BxTxD) -> SublayerOutput:
  del consts
  return SublayerOutput(nnx.merge(graphdef, layer_inputs[0]).mlp_sublayer(h_BxTxD))


def _moe_sublayer(graphdef, layer_inputs, consts, h_BxTxD, *, loss_weights: tuple[float, float]) -> SublayerOutput:
  """The MoE FFN; its weighted load-balancing and z-losses train the router, its statistics are side outputs."""
  del consts
  out_BxTxD, outputs = nnx.merge(graphdef, layer_inputs[0]).mlp_sublayer(h_BxTxD)
  aux_weight, z_weight = loss_weights
  return SublayerOutput(out_BxTxD, aux_loss=aux_weight * outputs.aux_loss + z_weight * outputs.z_loss,
                        side=jax.lax.stop_gradient(outputs))


class ModelOutput(NamedTuple):
  """What the depth loop of one forward pass gives back besides logits."""

  hidden_BxTxD: Array  # final-normed hidden states, the LM head's input
  aux_loss: Array  # the MoE layers' weighted auxiliary losses, summed (0 for dense models)
  moe: MoEOutputs | None  # per MoE layer, stacked `[L_moe, ...]` (no gradient); None for dense models
  stats: dict[str, Array]  # with `return_stats`; else empty


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
    width = rule.query_width(d_model, num_slots)
    shape = (num_layers, SUBLAYERS_PER_LAYER, width)
    names = (axes.LAYERS, axes.SUBLAYER, axes.DEPTH_EMBED)
    self.pseudo_query = logical_param(jnp.full(shape, rule.initial_query, param_dtype), names)
    self.output_query = logical_param(jnp.full((width,), rule.initial_query, param_dtype), (axes.DEPTH_EMBED,))
    has_gains = key_norm_gain and rule.has_key_gain
    self.key_gain = logical_param(jnp.ones(shape, param_dtype), names) if has_gains else None
    self.output_key_gain = (logical_param(jnp.ones((width,), param_dtype), (axes.DEPTH_EMBED,))
                            if has_gains else None)
    self.query_projection = (logical_param(
        jnp.zeros((num_layers, SUBLAYERS_PER_LAYER, d_model, d_model), param_dtype),
        (axes.LAYERS, axes.SUBLAYER, axes.EMBED, axes.DEPTH_EMBED)) if rule.has_query_projection else None)

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
    self.two_phase = config.two_phase
    self.unroll_layers = config.unroll_layers
    self.depth_scan_segments = config.depth_scan_segments
    self.mixing = Mixing(rule_from_config(config), config.norm_eps, config.depth_attention_impl)
    self.dtype = jnp.dtype(config.dtype)
    param_dtype = jnp.dtype(config.param_dtype)
    self.embedding = normal_param(rngs, (config.vocab_size, config.d_model), config.embed_init_std,
                                  (axes.VOCAB, axes.EMBED), param_dtype)

    def make_layers(count: int, ffn: str) -> TransformerLayer:
      @nnx.split_rngs(splits=count)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
      def make(rngs: nnx.Rngs) -> TransformerLayer:
        return TransformerLayer(config, ffn=ffn, rngs=rngs)
      return make(rngs)

    # MoE models may keep their first `moe.dense_layers` layers dense (DeepSeek / Moonlight): a separate stack.
    num_dense = config.moe.dense_layers if config.ffn == "moe" else 0
    self.dense_layers = make_layers(num_dense, "swiglu") if num_dense else None
    self.layers = make_layers(config.num_layers - num_dense, config.ffn)
    self.moe_loss_weights = ((config.moe.aux_loss_coef, config.moe.z_loss_coef) if config.ffn == "moe"
                             else None)
    self.stream_mixing = (StreamMixing(config.mhc_streams, config.mhc_residual_mixing, config.mhc_sinkhorn_iters)
                          if config.residual == "mhc" else None)
    self.depth = (None if config.residual in ("prenorm", "mhc") else DepthQueries(
        config.num_layers, config.d_model, self.schedule().num_slots, self.mixing.rule,
        key_norm_gain=config.key_norm_gain, param_dtype=param_dtype))
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype)
    self.head = (None if config.tie_embeddings else normal_param(
        rngs, (config.d_model, config.vocab_size), config.init_std, (axes.EMBED, axes.VOCAB), param_dtype))
    self.hyper = (None if self.stream_mixing is None else HyperConnections(
        config.num_layers, config.d_model, self.stream_mixing, init_std=config.init_std, param_dtype=param_dtype,
        rngs=rngs))

  def balance_experts(self, expert_load_LxE: Array) -> None:
    """Moves every MoE layer's selection bias towards balance by its measured load (`moe.updated_expert_bias`,
    DeepSeek-V3's auxiliary-loss-free balancing; docs/method.md §16)."""
    if self.moe_loss_weights is None:
      raise ValueError("balance_experts: this model has no MoE layers (model.ffn='swiglu')")
    bias = self.layers.mlp.expert_bias
    bias[...] = jax.vmap(updated_expert_bias, in_axes=(0, 0, None))(bias[...], expert_load_LxE,
                                                                  self.layers.mlp.spec.bias_update_rate)

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
    output = self.forward(tokens_BxT, segment_ids_BxT=segment_ids_BxT, return_stats=return_stats)
    return (output.hidden_BxTxD, output.stats) if return_stats else output.hidden_BxTxD

  def forward(self, tokens_BxT: Array, *, segment_ids_BxT: Array | None = None,
              return_stats: bool = False) -> ModelOutput:
    """Hidden states, the MoE layers' summed auxiliary loss and side outputs, and (`return_stats`) the
    statistics of `__call__`."""
    output, _ = self._forward(tokens_BxT, jnp.arange(tokens_BxT.shape[1]), None, None, segment_ids_BxT,
                              return_stats)
    return output

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
    output, new_keys_values = self._forward(tokens_BxT, positions_T, layer_cache, plan, None, False)
    return self.logits(output.hidden_BxTxD), write(cache, plan, positions_W, *new_keys_values)

  def _layer_groups(self, layer_cache) -> tuple[LayerGroup, ...]:
    """The dense layers (if any), then the main stack, each with its slice of the KV cache."""
    stacks = [] if self.dense_layers is None else [(self.dense_layers, _swiglu_sublayer)]
    stacks.append((self.layers, _swiglu_sublayer if self.moe_loss_weights is None
                   else functools.partial(_moe_sublayer, loss_weights=self.moe_loss_weights)))
    groups, start = [], 0
    for layers, ffn_sublayer in stacks:
      graphdef, params = nnx.split(layers)
      size = jax.tree.leaves(params)[0].shape[0]
      cache = jax.tree.map(lambda c: c[start:start + size], layer_cache)
      sublayers = (functools.partial(_attention_sublayer, graphdef), functools.partial(ffn_sublayer, graphdef))
      groups.append(LayerGroup(sublayers, (params, cache)))
      start += size
    return tuple(groups)

  def _forward(self, tokens_BxT, positions_T, layer_cache, plan, segment_ids_BxT, return_stats):
    """The `ModelOutput` and the attention sublayers' new keys and values `[L_b, B, T, K, H]` (or None)."""
    x_BxTxD = constrain(jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype), TOKEN_ACTIVATIONS)
    consts = (rope_tables(positions_T, self.head_dim, self.rope_theta), plan, segment_ids_BxT)
    groups = self._layer_groups(layer_cache)
    if self.depth is None:
      output = stream_loop(groups, consts, x_BxTxD, remat=self.remat, collect_stats=return_stats,
                           unroll=self.unroll_layers, mixing=self.stream_mixing,
                           hyper_params=None if self.hyper is None else self.hyper.params(), eps=self.norm_eps)
      h_BxTxD, stats = output.state, output.stats
    else:
      spec = LoopSpec(self.schedule(), self.mixing, remat=self.remat, two_phase=self.two_phase,
                      collect_stats=return_stats, unroll=self.unroll_layers, segments=self.depth_scan_segments)
      output = attnres_loop(groups, spec, depth_LxK=self.depth.sublayer_params(), embedding_BxTxD=x_BxTxD,
                            consts=consts)
      _, output_gain = self.depth.gains()
      h_BxTxD, output_weights = output_mix(self.mixing, output.state, self.depth.output_query[...], output_gain,
                                           with_weights=return_stats)
      stats = output.stats
      if return_stats:
        stats["output_depth_weights"] = output_weights
    attention_sides = [sides[0] for sides in output.sides]
    new_keys_values = None if layer_cache is None else jax.tree.map(lambda *x: jnp.concatenate(x), *attention_sides)
    moe = output.sides[-1][1] if self.moe_loss_weights is not None else None
    return ModelOutput(self.final_norm(h_BxTxD), output.aux_loss, moe, stats), new_keys_values
