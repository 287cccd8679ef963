"""AdamW or Muon (docs/method.md §15): warmup + cosine or warmup-stable-decay, clipping, a by-name decay mask."""

import jax
import ml_collections
import optax
from flax import nnx

from attnres_jax import axes

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
# Parameters whose names contain any of these are never weight-decayed: norm scales,
# pseudo-queries, output queries, key-norm gains and biases.
NO_DECAY_NAMES = ("scale", "pseudo_query", "output_query", "key_gain", "bias")
EMBEDDING_NAMES = ("embedding", "head")
# Logical axes a weight matrix reads from or writes to. Leading axes with other names (layers, sublayer,
# experts) index separate matrices, which Muon orthogonalises one by one.
MATRIX_AXES = (axes.EMBED, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM, axes.MLP, axes.DEPTH_EMBED)
# Per-layer matrices that stay with Adam: mHC's stream projection maps the streams to mixing coefficients.
ADAM_MATRIX_NAMES = ("stream_projection",)
# RMS of AdamW's updates that Muon's are scaled to with `optim.muon_match_adamw_rms` (Moonlight).
ADAMW_UPDATE_RMS = 0.2


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to `peak_lr`, then cosine to `min_lr_ratio * peak_lr`, or constant then linear decay."""
  end_lr = optim.peak_lr * optim.min_lr_ratio
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.peak_lr, optim.warmup_steps, num_steps, end_lr)
  if optim.schedule == "wsd":
    decay_steps = max(1, int(round(optim.wsd_decay_fraction * num_steps)))
    stable_steps = max(0, num_steps - optim.warmup_steps - decay_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, optim.peak_lr, optim.warmup_steps),
        optax.constant_schedule(optim.peak_lr),
        optax.linear_schedule(optim.peak_lr, end_lr, decay_steps),
    ], boundaries=[optim.warmup_steps, optim.warmup_steps + stable_steps])
  raise ValueError(f"config.optim.schedule={optim.schedule!r}: must be one of {SCHEDULES}")


def _names(path) -> list[str]:
  return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay, chosen by their path names."""

  def decays(path, _):
    names = _names(path)
    if any(skip in name for name in names for skip in NO_DECAY_NAMES):
      return False
    return decay_embeddings or not any(name in EMBEDDING_NAMES for name in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def matrix_dimensions(logical_axes: tuple[str | None, ...]) -> optax.contrib.MuonDimensionNumbers | None:
  """Muon's (input, output) axes of a per-layer matrix from its logical axis names; None: not one (§15).

  The matrix is what follows the leading non-matrix axes (which must include
  `layers`); the model width `embed` is its input where it comes first
  (`x @ W`), its output where it comes last, and the other axes are the other side.
  """
  first = next((i for i, name in enumerate(logical_axes) if name in MATRIX_AXES), len(logical_axes))
  matrix = tuple(range(first, len(logical_axes)))
  if axes.LAYERS not in logical_axes[:first] or len(matrix) < 2:
    return None
  if logical_axes[first] == axes.EMBED:
    return optax.contrib.MuonDimensionNumbers(reduction_axis=matrix[:1], output_axis=matrix[1:])
  if logical_axes[-1] == axes.EMBED:
    return optax.contrib.MuonDimensionNumbers(reduction_axis=matrix[:-1], output_axis=matrix[-1:])
  raise ValueError(f"logical axes {logical_axes}: a per-layer matrix must read or write {axes.EMBED!r} (first or "
                   "last of its matrix axes); add a rule to matrix_dimensions in attnres_jax/train/optim.py")


def muon_dimension_numbers(params: nnx.State) -> nnx.State:
  """`matrix_dimensions` of each parameter (None for those Adam updates), read from its `out_sharding` names."""

  def numbers(path, variable: nnx.Variable) -> nnx.Variable:
    logical_axes = variable.get_metadata().get("out_sharding")
    if logical_axes is None:
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no logical axis names (nnx.Param "
                       "out_sharding): Muon reads them to find its matrices")
    adam = any(name in ADAM_MATRIX_NAMES for name in _names(path))
    return variable.replace(None if adam else matrix_dimensions(tuple(logical_axes)))

  return jax.tree_util.tree_map_with_path(numbers, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def update_labels(params: nnx.State) -> nnx.State:
  """Each parameter's update: "muon" for every per-layer matrix, "adam" for the rest."""
  label = lambda numbers: numbers.replace("adam" if numbers.get_value() is None else "muon")
  return jax.tree.map(label, muon_dimension_numbers(params), is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """`optim.name`'s update after global-norm clipping, on one learning-rate schedule (§15)."""
  learning_rate = learning_rate_schedule(optim, num_steps)
  mask = lambda params: decay_mask(params, optim.decay_embeddings)
  tx = optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                   mask=mask)
  if optim.name == "muon":
    # optax's muon gets only the matrices: its own Adam branch shares Muon's Nesterov flag and has no decay mask.
    muon = optax.contrib.muon(
        learning_rate, ns_steps=optim.muon_ns_steps, beta=optim.muon_momentum, weight_decay=optim.weight_decay,
        weight_decay_mask=mask, muon_weight_dimension_numbers=muon_dimension_numbers,
        consistent_rms=ADAMW_UPDATE_RMS if optim.muon_match_adamw_rms else None)
    tx = optax.partition({"muon": muon, "adam": tx}, update_labels)
  clip = [optax.clip_by_global_norm(optim.grad_clip_norm)] if optim.grad_clip_norm > 0 else []
  return optax.chain(*clip, tx)
