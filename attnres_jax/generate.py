"""Autoregressive generation: jitted prefill and fixed-size decode step, and token sampling.

Decoding uses `Transformer.extend` with a KV cache (`model/kv_cache.py`): one
prefill call for the prompt, then one compiled step per token whose cache
shape never changes. Sampling follows the usual order: temperature, then
top-k, then top-p (nucleus) filtering of the scaled logits.
"""

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from attnres_jax.model.transformer import Transformer
from attnres_jax.model.kv_cache import KVCache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; ids from `num_ids` on (a
  vocabulary padded beyond the tokenizer's) are never drawn, 0 = none excluded."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_ids: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if self.num_ids < 0:
      raise ValueError(f"num_ids must be >= 0 (0 = every id), got {self.num_ids}")


def sample_tokens(logits_BxV: Array, key: Array, sampling: Sampling) -> Array:
  """One token id per row `[B]` drawn from `logits_BxV` under `sampling`."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if sampling.num_ids:
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < sampling.num_ids, logits_BxV, -jnp.inf)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k:
    kth_largest_Bx1 = jax.lax.top_k(logits_BxV, min(sampling.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_largest_Bx1, -jnp.inf, logits_BxV)
  if sampling.top_p < 1:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # keep tokens until top_p is covered
    cutoff_Bx1 = jnp.min(jnp.where(mass_before_BxV < sampling.top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


class Generator:
  """Jitted prefill and decode step of one model, with a cache of `window` positions."""

  def __init__(self, model: Transformer, window: int, sampling: Sampling):
    self.graphdef, self.state = nnx.split(model)
    self.window, self.sampling = window, sampling
    self.prefill = jax.jit(self._prefill)
    self.decode_step = jax.jit(self._decode_step, donate_argnums=(1,))

  def _prefill(self, state, prompt_BxP: Array, key: Array) -> tuple[Array, KVCache]:
    model = nnx.merge(self.graphdef, state)
    logits_BxPxV, cache = model.extend(prompt_BxP, model.empty_cache(prompt_BxP.shape[0], self.window))
    return sample_tokens(logits_BxPxV[:, -1], key, self.sampling), cache

  def _decode_step(self, state, cache: KVCache, tokens_B: Array, key: Array) -> tuple[Array, KVCache]:
    logits_Bx1xV, cache = nnx.merge(self.graphdef, state).extend(tokens_B[:, None], cache)
    return sample_tokens(logits_Bx1xV[:, 0], key, self.sampling), cache

  def generate(self, prompt_BxP: Array, max_new_tokens: int, seed: int) -> Iterator[Array]:
    """Yields `max_new_tokens` sampled tokens `[B]`, one per step (stream them as they come)."""
    if not 1 <= prompt_BxP.shape[1] <= self.window:
      raise ValueError(f"the prompt has {prompt_BxP.shape[1]} tokens; it must have 1 to {self.window} "
                       f"(the model's context)")
    keys = jax.random.split(jax.random.key(seed), max(max_new_tokens, 1))
    if max_new_tokens < 1:
      return
    tokens_B, cache = self.prefill(self.state, prompt_BxP, keys[0])
    yield tokens_B
    for key in keys[1:]:
      tokens_B, cache = self.decode_step(self.state, cache, tokens_B, key)
      yield tokens_B
