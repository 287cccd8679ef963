"""Next-token cross-entropy of a language model, whole or in chunks of positions.

The chunked loss (docs/method.md §13) never holds the float32 logits
`[B, T, V]`: a scan over chunks of `chunk_size` positions of every sequence
builds one chunk's logits `[B, c, V]`, takes its summed cross-entropy and drops
them; the backward pass recomputes them chunk by chunk (`jax.checkpoint`). At
the paper's sizes the whole logits of one chip's batch are 40 GiB.

With an end-of-document id (document masking, docs/method.md §14) the model's
inputs get segment ids, so no token attends across an end-of-document token;
every position still predicts its target (the token after an EOD from the EOD).
"""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array) -> Array:
  """Mean cross-entropy of integer targets under the logits."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT))


def document_segment_ids(tokens_BxT: Array, eod_id: int) -> Array:
  """Segment ids `[B, T]` (int32): the count of `eod_id` tokens up to and including each position.

  An EOD token thus opens the segment of the document after it, as that
  document's first token (docs/method.md §14).
  """
  return jnp.cumsum(tokens_BxT == eod_id, axis=1, dtype=jnp.int32)


# `eod_id` is not keyword-only: `nnx.grad(next_token_loss)` binds every argument by position.
def next_token_loss(model, tokens_BxT1: Array, chunk_size: int = 0, eod_id: int | None = None) -> Array:
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (`chunk_size`: `lm_head_loss`'s);
  with `eod_id`, attention stays inside the documents of the inputs (`document_segment_ids`)."""
  inputs_BxT = tokens_BxT1[:, :-1]
  segment_ids_BxT = None if eod_id is None else document_segment_ids(inputs_BxT, eod_id)
  return lm_head_loss(model, model.hidden(inputs_BxT, segment_ids_BxT=segment_ids_BxT), tokens_BxT1[:, 1:],
                      chunk_size)


def training_loss(model, tokens_BxT1: Array, chunk_size: int = 0, eod_id: int | None = None
                  ) -> tuple[Array, dict[str, Array]]:
  """The objective a train step minimises: `next_token_loss` plus the MoE layers' weighted auxiliary losses
  (docs/method.md §16); and its parts: `cross_entropy` and, for MoE models, the layers' mean `moe_aux_loss`,
  `moe_z_loss`, `moe_dropped_fraction`, the load imbalance `moe_max_load` (largest expert load over the mean)
  and each layer's `expert_load` `[L_moe, E]`."""
  inputs_BxT = tokens_BxT1[:, :-1]
  segment_ids_BxT = None if eod_id is None else document_segment_ids(inputs_BxT, eod_id)
  output = model.forward(inputs_BxT, segment_ids_BxT=segment_ids_BxT)
  loss = lm_head_loss(model, output.hidden_BxTxD, tokens_BxT1[:, 1:], chunk_size)
  parts = {"cross_entropy": loss}
  if output.moe is not None:
    load_LxE = output.moe.expert_load_E
    parts.update(moe_aux_loss=jnp.mean(output.moe.aux_loss), moe_z_loss=jnp.mean(output.moe.z_loss),
                 moe_dropped_fraction=jnp.mean(output.moe.dropped_fraction),
                 moe_max_load=jnp.max(load_LxE * load_LxE.shape[-1]), expert_load=load_LxE)
  return loss + output.aux_loss, parts


def lm_head_loss(model, hidden_BxTxD: Array, targets_BxT: Array, chunk_size: int = 0) -> Array:
  """Mean cross-entropy of the targets under `model.logits` of final-normed hidden states.

  `chunk_size` > 0 takes the logits that many positions at a time (it must
  divide the sequence length): the same loss and gradients, without the whole logits.
  """
  if not chunk_size:
    return cross_entropy(model.logits(hidden_BxTxD), targets_BxT)
  batch, length = targets_BxT.shape
  if length % chunk_size:
    raise ValueError(f"loss chunk size {chunk_size} must divide the sequence length {length}")
  # Chunk c holds positions c*chunk .. (c+1)*chunk - 1 of every sequence, so the batch keeps its sharding.
  split = lambda x: jnp.swapaxes(x.reshape((batch, length // chunk_size, chunk_size) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def chunk_loss(hidden_BxCxD: Array, targets_BxC: Array) -> Array:
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden_BxCxD), targets_BxC))

  def add_chunk(total: Array, chunk: tuple[Array, Array]) -> tuple[Array, None]:
    return total + chunk_loss(*chunk), None

  zero = jnp.zeros((), jnp.promote_types(hidden_BxTxD.dtype, jnp.float32))
  total, _ = jax.lax.scan(add_chunk, zero, (split(hidden_BxTxD), split(targets_BxT)), unroll=model.unroll_layers)
  return total / (batch * length)
