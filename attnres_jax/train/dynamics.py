"""Training dynamics of docs/method.md §10, logged every `config.train.dynamics_every` steps.

Per sublayer: the RMS of its input and output, the gradient norm of its own
weights (pre-norm included), and for AttnRes the token-averaged depth weights
over its sources `[L, N + 1]` (and the output query's); for MoE models each
layer's load per expert `expert_load` `[L_moe, E]` (docs/method.md §16). A separate jitted
step computes them on the first micro-batch of the step's batch, before the
update, so the training step itself is unchanged. Records go to
`<workdir>/dynamics.jsonl` (read back by `read_dynamics`; a resumed run's
repeated step keeps the later record) and to TensorBoard.
"""

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnres_jax.model.transformer import SUBLAYER_MODULES
from attnres_jax.train.loss import document_segment_ids, lm_head_loss
from attnres_jax.train.metrics import open_jsonl

Array = jax.Array
FILENAME = "dynamics.jsonl"


def sublayer_grad_norms(layer_grads: nnx.State) -> Array:
  """`[L]` gradient norms of each sublayer's weights, in sublayer order, from the stacked layers' gradients."""
  per_kind = []
  for modules in SUBLAYER_MODULES:
    leaves = jax.tree.leaves([layer_grads[name] for name in modules])
    per_kind.append(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(jnp.float32)), axis=1) for g in leaves))
  return jnp.sqrt(jnp.stack(per_kind, axis=1).reshape(-1))


def make_dynamics_step(graphdef: nnx.GraphDef, grad_accum_steps: int, *, loss_chunk_size: int = 0,
                       eod_id: int | None = None) -> Callable[[nnx.State, Array], dict]:
  """Jitted `(params, batch [B, T + 1]) -> dynamics`, on the train step's first micro-batch
  (`loss_chunk_size`: `lm_head_loss`'s; `eod_id`: document masking, as in `next_token_loss`)."""

  def dynamics(params, tokens_BxT1):
    micro_batch_MxT1 = tokens_BxT1[::grad_accum_steps]
    inputs_MxT = micro_batch_MxT1[:, :-1]
    segment_ids_MxT = None if eod_id is None else document_segment_ids(inputs_MxT, eod_id)

    def loss_and_stats(params):
      model = nnx.merge(graphdef, params)
      output = model.forward(inputs_MxT, segment_ids_BxT=segment_ids_MxT, return_stats=True)
      stats = output.stats if output.moe is None else {**output.stats, "expert_load": output.moe.expert_load_E}
      loss = lm_head_loss(model, output.hidden_BxTxD, micro_batch_MxT1[:, 1:], loss_chunk_size)
      return loss + output.aux_loss, stats  # the objective trained: the MoE's auxiliary losses included

    (loss, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params)
    stacks = [grads[name] for name in ("dense_layers", "layers") if name in grads]  # in layer order
    return {"loss": loss, **stats, "grad_norm": jnp.concatenate([sublayer_grad_norms(g) for g in stacks])}

  return jax.jit(dynamics)


class DynamicsLog:
  """Appends dynamics records to `<workdir>/dynamics.jsonl` and to a TensorBoard writer (if `is_main`: the main
  process of a run that logs dynamics)."""

  def __init__(self, workdir: str, tensorboard, *, is_main: bool):
    self.is_main, self.tensorboard = is_main, tensorboard
    self.file = open_jsonl(os.path.join(workdir, FILENAME)) if is_main else None

  def write(self, step: int, dynamics: dict[str, Array]) -> None:
    if not self.is_main:
      return
    values = {name: np.asarray(value, np.float64) for name, value in jax.device_get(dynamics).items()}
    self.file.write(json.dumps({"step": step, **{name: v.tolist() for name, v in values.items()}}) + "\n")
    self.file.flush()
    for name in ("input_rms", "output_rms", "grad_norm"):
      for sublayer, value in enumerate(values[name]):
        self.tensorboard.add_scalar(f"dynamics/{name}/sublayer_{sublayer:03d}", value, step)
    if "expert_load" in values:  # MoE layer x expert, as a multiple of the balanced load 1 / E
      load = values["expert_load"] * values["expert_load"].shape[-1]
      for layer, per_expert in enumerate(load):
        self.tensorboard.add_scalar(f"dynamics/expert_load_max/moe_layer_{layer:03d}", per_expert.max(), step)
        self.tensorboard.add_scalar(f"dynamics/expert_load_min/moe_layer_{layer:03d}", per_expert.min(), step)
      self.tensorboard.add_image("dynamics/expert_load", (load / max(load.max(), 1e-12))[None], step,
                                 dataformats="CHW")
    if "depth_weights" in values:  # target sublayer x source, scaled to the largest absolute weight
      weights = np.abs(values["depth_weights"])
      image = weights / max(weights.max(), 1e-12)
      self.tensorboard.add_image("dynamics/depth_weights", image[None], step, dataformats="CHW")

  def close(self) -> None:
    if self.is_main:
      self.file.close()


def read_dynamics(workdir: str) -> list[dict]:
  """The records of `<workdir>/dynamics.jsonl` by step, arrays as numpy; for a repeated step the later wins."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: train with config.train.dynamics_every > 0")
  latest = {}
  with open(path, encoding="utf-8") as lines:
    for line in lines:
      record = json.loads(line)
      latest[record["step"]] = {k: (v if k == "step" else np.asarray(v)) for k, v in record.items()}
  if not latest:
    raise ValueError(f"{path} holds no records yet: the run has not reached config.train.dynamics_every steps")
  return [latest[step] for step in sorted(latest)]
