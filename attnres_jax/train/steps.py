"""Pure, jitted train and eval steps over a `TrainState` pytree."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from attnres_jax.train.loss import next_token_loss, training_loss

Array = jax.Array


class TrainState(NamedTuple):
  params: nnx.State
  opt_state: optax.OptState
  step: Array  # optimiser steps taken, int32
  rng: Array  # raw key data of the run's PRNG key (for stochastic features; saved in checkpoints)


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed)))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum_steps: int,
                    state_sharding=None, *, loss_chunk_size: int = 0, unroll: bool = False,
                    eod_id: int | None = None) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
  """One optimiser step on a batch `[B, T + 1]`, averaging gradients over `grad_accum_steps` micro-batches.

  With `state_sharding` (a TrainState of shardings) the new state keeps the
  layout of the old one, so the donated buffers are reused step after step.
  `loss_chunk_size` and `eod_id` (document masking) are `next_token_loss`'s;
  `unroll` unrolls the micro-batch loop (the TPU compiler's cost analysis
  counts a loop body once). It minimises `training_loss` (for MoE models the
  cross-entropy plus their auxiliary losses), then moves the MoE selection
  biases by the step's expert loads (docs/method.md §16). Metrics: `loss` (the
  cross-entropy), the MoE parts of `training_loss`, and gradient, update and
  parameter norms.
  """

  def loss_fn(params, tokens_BxT1):
    return training_loss(nnx.merge(graphdef, params), tokens_BxT1, loss_chunk_size, eod_id=eod_id)

  def train_step(state: TrainState, tokens_BxT1: Array):
    # Micro-batch a is rows a, a + A, ...: each one spans every device of the batch axes.
    micro_batches_AxMxT1 = tokens_BxT1.reshape((-1, grad_accum_steps) + tokens_BxT1.shape[1:]).swapaxes(0, 1)

    def accumulate(grads, micro_batch_MxT1):
      (_, parts), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro_batch_MxT1)
      return jax.tree.map(jnp.add, grads, micro_grads), parts

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, parts_A = jax.lax.scan(accumulate, zeros, micro_batches_AxMxT1, unroll=unroll)
    parts = jax.tree.map(lambda x: jnp.mean(x, axis=0), parts_A)
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if "expert_load" in parts:  # auxiliary-loss-free balancing of the MoE layers, after the update
      model = nnx.merge(graphdef, params)
      model.balance_experts(parts.pop("expert_load"))
      params = nnx.split(model, nnx.Param)[1]
    metrics = {"loss": parts.pop("cross_entropy"), **parts, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates), "param_norm": optax.tree.norm(params)}
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  out_shardings = None if state_sharding is None else (state_sharding, None)
  return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)


def make_eval_step(graphdef: nnx.GraphDef, *, loss_chunk_size: int = 0, eod_id: int | None = None
                   ) -> Callable[[nnx.State, Array], Array]:
  """Mean next-token loss of one batch `[B, T + 1]` (`loss_chunk_size`, `eod_id`: `next_token_loss`'s)."""
  return jax.jit(lambda params, tokens_BxT1: next_token_loss(nnx.merge(graphdef, params), tokens_BxT1,
                                                             loss_chunk_size, eod_id=eod_id))
