"""Whether a run may resume a checkpoint trained with another config: one clear error, or a note.

A checkpoint stores the config it was trained with. Resuming compares it with
the current one, field by field:

- `SAFE_TO_CHANGE` fields never matter for the computation that resumes: the
  cadence of logs, evaluations and checkpoints, the mesh and device layout,
  the multi-host setup, and implementation choices with the same outputs and
  gradients (rematerialisation, the attention and depth-attention kernels,
  two-phase, gradient accumulation, unrolled loops, the loss chunk size,
  profiling). They go through; the run prints what changed.
- `train.num_steps` may change when the learning rate of every step already
  taken stays the same: extending a WSD run in its stable phase (or a run
  still in warmup). Extending a cosine run would bend the curve already
  followed, so it is refused.
- Fields added to the config since a checkpoint was written count as their
  old behaviour (`ADDED_FIELDS`).
- Any other change (the model, the data or its order, batch size, sequence
  length, optimiser, schedule) would silently continue at the old batch index
  with a different run: it is refused with the fields named, unless the user
  lists them deliberately in `config.train.resume_accept_changes`.
"""

import json
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from attnres_jax.train.optim import learning_rate_schedule

SAFE_TO_CHANGE = (
    "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.max_to_keep",
    "train.async_checkpointing", "train.dynamics_every", "train.seed", "train.resume_accept_changes",
    "data.cache_dir", "mesh", "distributed",
    "model.remat", "model.depth_attention_impl", "model.two_phase", "optim.grad_accum_steps",
    "model.attention_impl", "model.unroll_layers", "train.loss_chunk_size", "train.profile_steps",
    "model.moe.impl",
)


# Fields added to the config after workdirs were first written, and the value that reproduces those runs.
# The MoE fields of a dense model (ffn=swiglu) change nothing (`check_resume` ignores them); configs/base.py's.
DENSE_MOE_FIELDS = {"num_experts": 8, "top_k": 2, "num_shared_experts": 1, "score_function": "softmax",
                    "normalize_top_k": True, "routed_scaling_factor": 1.0, "capacity_factor": 0.0, "impl": "auto",
                    "dense_layers": 0, "dense_d_ff": 0, "aux_loss_coef": 1e-3, "z_loss_coef": 0.0,
                    "bias_update_rate": 1e-3}
ADDED_FIELDS = {"model": {"attention_impl": "xla", "unroll_layers": False, "depth_scan_segments": 1,
                          "depth_query_norm": False, "ffn": "swiglu", "moe": DENSE_MOE_FIELDS},
                "mesh": {"expert": 1},
                "data": {"tokenizer": "bytes", "bpe_vocab_size": 4096, "document_masking": False},
                "optim": {"name": "adamw", "muon_momentum": 0.95, "muon_ns_steps": 5, "muon_match_adamw_rms": True},
                "train": {"loss_chunk_size": 0, "profile_steps": ""}}


def complete_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config with the fields added since it was written (`ADDED_FIELDS`) at their old values."""
  return {section: {**ADDED_FIELDS.get(section, {}), **fields} if isinstance(fields, dict) else fields
          for section, fields in saved.items()}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted field: (saved, current)}` for every field whose value differs (JSON-normalised)."""
  flat = lambda config: traverse_util.flatten_dict(dict(config), sep=".")
  saved, current = flat(saved), flat(current)
  return {field: (saved.get(field), current.get(field)) for field in sorted(set(saved) | set(current))
          if saved.get(field) != current.get(field)}


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict, step: int) -> list[str]:
  """Raises ValueError if resuming `step` of a run trained with `saved` under `config` is not the same run.

  Returns the fields that changed and are accepted (for the run to print).
  """
  saved = complete_saved_config(saved)
  changes = config_changes(saved, _as_json(config))
  accepted = {field.strip() for field in config.train.resume_accept_changes.split(",") if field.strip()}
  dense = saved["model"]["ffn"] == config.model.ffn == "swiglu"  # then the MoE fields change nothing
  refused = {}
  for field, (was, now) in changes.items():
    if any(field == safe or field.startswith(safe + ".") for safe in SAFE_TO_CHANGE) or field in accepted:
      continue
    if dense and field.startswith("model.moe."):
      continue
    if field == "train.num_steps" and _same_learning_rates(config, was, step):
      continue
    refused[field] = (was, now)
  if refused:
    listed = "; ".join(f"{field}: {was!r} -> {now!r}" for field, (was, now) in refused.items())
    hint = (" train.num_steps may change only where the learning rate of the steps already taken stays the "
            "same (a WSD run in its stable phase)." if "train.num_steps" in refused else "")
    raise ValueError(
        f"The checkpoint at step {step} was trained with another config ({listed}). Resuming would continue "
        f"at the old batch index with a different run.{hint} Use the saved config (config.json in the "
        f"workdir) or a new --workdir; to resume anyway, list the fields on purpose in "
        f"--config.train.resume_accept_changes={','.join(refused)}. Nothing was changed.")
  return [field for field in changes if field != "train.resume_accept_changes"]


def _same_learning_rates(config: ml_collections.ConfigDict, saved_num_steps: int, step: int) -> bool:
  """Whether steps 0 .. step - 1 had the same learning rate under the saved num_steps as under the new one."""
  if not isinstance(saved_num_steps, int):
    return False
  steps = np.arange(step)
  before = learning_rate_schedule(config.optim, saved_num_steps)(steps)
  after = learning_rate_schedule(config.optim, config.train.num_steps)(steps)
  return bool(np.allclose(before, after, rtol=1e-6, atol=0.0))


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as it is saved (tuples become lists), so that saved and current values compare equal."""
  return json.loads(config.to_json_best_effort())
