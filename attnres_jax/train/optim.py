"""AdamW with warmup + cosine or warmup-stable-decay, clipping and a by-name decay mask."""

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "wsd")
# Parameters whose names contain any of these are never weight-decayed: norm scales,
# pseudo-queries, output queries, key-norm gains and biases.
NO_DECAY_NAMES = ("scale", "pseudo_query", "output_query", "key_gain", "bias")
EMBEDDING_NAMES = ("embedding", "head")


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


def decay_mask(params, decay_embeddings: bool):
  """True for the parameters that get weight decay, chosen by their path names."""

  def decays(path, _):
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    if any(skip in name for name in names for skip in NO_DECAY_NAMES):
      return False
    return decay_embeddings or not any(name in EMBEDDING_NAMES for name in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  clip = [optax.clip_by_global_norm(optim.grad_clip_norm)] if optim.grad_clip_norm > 0 else []
  return optax.chain(*clip, optax.adamw(
      learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=lambda params: decay_mask(params, optim.decay_embeddings)))
