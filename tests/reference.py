"""An independent, literal implementation of docs/method.md §1-§5 and §8, for tests only.

Python lists of sources, one plain softmax over keys per sublayer, the state
update of docs/method.md §4 written exactly as that section states it.
It shares the model's parameters and sublayer functions, not its depth loop
or its mixing code.
"""

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from attnres_jax.model.layers import rope_tables
from attnres_jax.residuals.mixing_rules import LearnedLogits


def depth_attention(sources, query, gain, eps):
  """docs/method.md §2 written out with jnp, independent of the package's mixing code."""
  v = sources.astype(jnp.promote_types(sources.dtype, jnp.float32))
  keys = gain * v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
  weights = jax.nn.softmax(jnp.einsum("s...d,d->s...", keys, query), axis=0)
  return jnp.einsum("s...,s...d->...d", weights, v).astype(sources.dtype)


def layer_at(model, j):
  """Layer `j` of the model: of its dense stack first (MoE models' `dense_layers`), then of `layers`."""
  num_dense = 0 if model.dense_layers is None else jax.tree.leaves(nnx.state(model.dense_layers))[0].shape[0]
  stack, index = (model.dense_layers, j) if j < num_dense else (model.layers, j - num_dense)
  graphdef, params = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda p: p[index], params))


def ffn_output(model, layer, h, aux_losses=None):
  """The FFN sublayer's output; an MoE's weighted auxiliary losses are appended to `aux_losses`."""
  output = layer.mlp_sublayer(h)
  if not isinstance(output, tuple):
    return output
  out, moe = output
  if aux_losses is not None:
    aux_weight, z_weight = model.moe_loss_weights
    aux_losses.append(aux_weight * moe.aux_loss + z_weight * moe.z_loss)
  return out


def reference_logits(model, tokens_BxT, record_sources=None, aux_losses=None):
  """Logits of `model` with its depth loop replaced by the literal docs/method.md §4.

  If `record_sources` is a list, the list of source values each sublayer
  attends to is appended to it (then the output query's); MoE layers append
  their weighted auxiliary losses to `aux_losses`.
  """
  x = jnp.take(model.embedding[...], tokens_BxT, axis=0).astype(model.dtype)
  rope = rope_tables(jnp.arange(tokens_BxT.shape[1]), model.head_dim, model.rope_theta)

  def sublayer(l, h):
    layer = layer_at(model, l // 2)
    return layer.attention_sublayer(rope, h)[0] if l % 2 == 0 else ffn_output(model, layer, h, aux_losses)

  if model.depth is None:
    h = x
    for l in range(model.num_sublayers):
      h = h + sublayer(l, h)
  else:
    eps = model.norm_eps
    gains, output_gain = model.depth.gains()
    blocks, partial = [], x
    for l in range(model.num_sublayers):
      sources = blocks + [partial]  # docs/method.md §4: mix first, then seal at a block start
      query, gain = model.depth.pseudo_query[...][l // 2, l % 2], gains[l // 2, l % 2]
      h = depth_attention(jnp.stack(sources), query, gain, eps)
      if l % model.block_size == 0:
        blocks.append(partial)
        partial = jnp.zeros_like(partial)
      if record_sources is not None:
        record_sources.append(sources)
      partial = partial + sublayer(l, h)
    sources = blocks + [partial]
    if record_sources is not None:
      record_sources.append(sources)
    h = depth_attention(jnp.stack(sources), model.depth.output_query[...], output_gain, eps)
  h = model.final_norm(h)
  head = model.embedding[...].T if model.head is None else model.head[...]
  return jnp.einsum("btd,dv->btv", h, head.astype(model.dtype),
                    preferred_element_type=jnp.promote_types(model.dtype, jnp.float32))


def full_variant_mix(model, values, query, gain, projection=None):
  """`h` over the sources `values` of Full AttnRes under the model's ablation rule (docs/method.md §8): every
  value is visible, its learned-logit column is its position, the newest feeds the input-dependent query."""
  return literal_rule_mix(model.mixing.rule, values, query, gain, model.norm_eps, columns=list(range(len(values))),
                          newest=values[-1], projection=projection)


def full_reference_logits(model, tokens_BxT):
  """Full AttnRes literally (docs/method.md §3): sublayer l attends to v_0 .. v_{l-1}; also its §8 variants."""
  x = jnp.take(model.embedding[...], tokens_BxT, axis=0).astype(model.dtype)
  rope = rope_tables(jnp.arange(tokens_BxT.shape[1]), model.head_dim, model.rope_theta)
  gains, output_gain = model.depth.gains()
  projections = model.depth.query_projection
  values = [x]
  for l in range(model.num_sublayers):
    query, gain = model.depth.pseudo_query[...][l // 2, l % 2], gains[l // 2, l % 2]
    if model.mixing.rule.fused:
      h = depth_attention(jnp.stack(values), query, gain, model.norm_eps)
    else:
      projection = None if projections is None else projections[...][l // 2, l % 2]
      h = full_variant_mix(model, values, query, gain, projection)
    layer = layer_at(model, l // 2)
    values.append(layer.attention_sublayer(rope, h)[0] if l % 2 == 0 else layer.mlp_sublayer(h))
  if model.mixing.rule.fused:
    h = depth_attention(jnp.stack(values), model.depth.output_query[...], output_gain, model.norm_eps)
  else:
    h = full_variant_mix(model, values, model.depth.output_query[...], output_gain)
  head = model.embedding[...].T if model.head is None else model.head[...]
  return jnp.einsum("btd,dv->btv", model.final_norm(h), head.astype(model.dtype),
                    preferred_element_type=jnp.promote_types(model.dtype, jnp.float32))


def mhc_reference_logits(model, tokens_BxT):
  """mHC literally (docs/method.md §12.9): a Python list of m streams, per-token coefficients, plain Sinkhorn."""
  x = jnp.take(model.embedding[...], tokens_BxT, axis=0).astype(model.dtype)
  rope = rope_tables(jnp.arange(tokens_BxT.shape[1]), model.head_dim, model.rope_theta)
  mixing, m = model.stream_mixing, model.stream_mixing.streams
  streams = [x] * m
  for l in range(model.num_sublayers):
    projection, gates, bias = (p[...][l // 2, l % 2] for p in (model.hyper.stream_projection,
                                                               model.hyper.stream_gates, model.hyper.stream_bias))
    flat = jnp.concatenate(streams, axis=-1)  # [B, T, m d], stream-major
    normed = flat / jnp.sqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + model.norm_eps)
    raw = normed @ projection
    pre = jax.nn.sigmoid(gates[0] * raw[..., :m] + bias[:m])
    post = 2 * jax.nn.sigmoid(gates[1] * raw[..., m:2 * m] + bias[m:2 * m])
    res_logits = gates[2] * raw[..., 2 * m:] + bias[2 * m:]
    if mixing.residual_mixing == "sinkhorn":
      res = jnp.exp(res_logits.reshape(res_logits.shape[:-1] + (m, m)))
      for _ in range(mixing.sinkhorn_iters):
        res = res / jnp.sum(res, axis=-1, keepdims=True)
        res = res / jnp.sum(res, axis=-2, keepdims=True)
    else:
      permutations = list(itertools.permutations(range(m)))
      weights = jax.nn.softmax(res_logits, axis=-1)
      res = sum(weights[..., p, None, None] * jnp.eye(m)[jnp.array(perm)] for p, perm in enumerate(permutations))
    h = sum(pre[..., j, None] * streams[j] for j in range(m))
    layer = layer_at(model, l // 2)
    out = layer.attention_sublayer(rope, h)[0] if l % 2 == 0 else layer.mlp_sublayer(h)
    streams = [sum(res[..., i, j, None] * streams[j] for j in range(m)) + post[..., i, None] * out for i in range(m)]
  h = model.final_norm(sum(streams) / m)
  head = model.embedding[...].T if model.head is None else model.head[...]
  return jnp.einsum("btd,dv->btv", h, head.astype(model.dtype),
                    preferred_element_type=jnp.promote_types(model.dtype, jnp.float32))


def literal_rule_mix(rule, sources, query, gain, eps, *, columns, newest=None, projection=None):
  """`h` over the visible `sources` (a list, oldest first) under any registered rule, written out literally:
  `columns` are the sources' learned-logit indices; `newest` feeds the input-dependent query `w + W newest`
  (`w + W RMSNorm(newest)` with the rule's `query_norm`)."""
  v = jnp.stack(sources)
  if isinstance(rule, LearnedLogits):
    logits = jnp.broadcast_to(query[jnp.array(columns)][:, None, None, None], v.shape[:-1] + (1,))
  else:
    if projection is not None:
      if rule.query_norm:
        newest = newest / jnp.sqrt(jnp.mean(newest * newest, axis=-1, keepdims=True) + eps)
      query = query + newest @ projection
    keys = v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps) if rule.key_norm else v
    heads, width = rule.num_heads, v.shape[-1]
    keys = (keys * gain).reshape(v.shape[:-1] + (heads, width // heads))
    logits = jnp.sum(keys * jnp.reshape(query, query.shape[:-1] + (heads, width // heads)), axis=-1)
  if rule.normalization == "softmax":
    weights = jax.nn.softmax(logits, axis=0)
  else:
    weights = jax.nn.sigmoid(logits) if rule.normalization == "sigmoid" else logits
  grouped = v.reshape(v.shape[:-1] + (weights.shape[-1], -1))
  return jnp.einsum("sbth,sbthc->bthc", weights, grouped).reshape(v.shape[1:])


def rule_reference_logits(model, tokens_BxT):
  """Block AttnRes (Full: block size 1) literally (docs/method.md §4) under the model's mixing rule, whatever
  it is: Python lists of blocks, the window as a cut of that list, learned logits indexed by slot (§12.5)."""
  x = jnp.take(model.embedding[...], tokens_BxT, axis=0).astype(model.dtype)
  rope = rope_tables(jnp.arange(tokens_BxT.shape[1]), model.head_dim, model.rope_theta)
  rule, eps = model.mixing.rule, model.norm_eps
  gains, output_gain = model.depth.gains()
  projections = model.depth.query_projection
  num_slots = model.schedule().num_slots

  def mix(query, gain, blocks, partial, partial_column, projection=None):
    sources, columns = blocks + [partial], list(range(len(blocks))) + [partial_column]
    if rule.window:  # the embedding and the `window` newest
      keep = [0] + [i for i in range(len(sources)) if i >= max(1, len(sources) - rule.window)]
      sources, columns = [sources[i] for i in keep], [columns[i] for i in keep]
    return literal_rule_mix(rule, sources, query, gain, eps, columns=columns, newest=partial, projection=projection)

  blocks, partial = [], x
  for l in range(model.num_sublayers):
    starts_block = l % model.block_size == 0
    projection = None if projections is None else projections[...][l // 2, l % 2]
    h = mix(model.depth.pseudo_query[...][l // 2, l % 2], gains[l // 2, l % 2], blocks, partial,
            len(blocks) if starts_block else num_slots, projection)
    if starts_block:
      blocks.append(partial)
      partial = jnp.zeros_like(partial)
    layer = layer_at(model, l // 2)
    partial = partial + (layer.attention_sublayer(rope, h)[0] if l % 2 == 0 else layer.mlp_sublayer(h))
  h = mix(model.depth.output_query[...], output_gain, blocks, partial, num_slots)
  head = model.embedding[...].T if model.head is None else model.head[...]
  return jnp.einsum("btd,dv->btv", model.final_norm(h), head.astype(model.dtype),
                    preferred_element_type=jnp.promote_types(model.dtype, jnp.float32))
