"""Rematerialisation policies shared by the PreNorm and AttnRes depth loops."""

from typing import Callable

import jax

REMAT_POLICIES = ("none", "full", "save_dots")


def checkpointed(fn: Callable, remat: str) -> Callable:
  """`fn` under the named policy.

  none: save every activation; full: save only the inputs and recompute the
  rest in the backward pass; save_dots: also keep the weight matmul outputs
  (not the batched attention-score matmuls, which grow with T^2).
  """
  if remat == "none":
    return fn
  if remat == "full":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
  if remat == "save_dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
