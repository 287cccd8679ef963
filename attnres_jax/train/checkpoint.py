"""Orbax checkpoints of the train state and the data iterator, sealed by a manifest; safe resume.

Each checkpoint `<workdir>/checkpoints/<step>/` holds three orbax items: `state`
(the `TrainState`: parameters, optimiser state, step, RNG), `data` (each
process's grain iterator position, one file per process) and `run` (the
resolved config it was trained with). Orbax writes into a temporary directory
and renames it when complete, so a killed save never shows up as a step.

Once a save has finished, process 0 seals it with `commit_manifest.json`: every
file of the step with its size, written atomically. Restoring decides on what
was written, never on the text of an error:

- a sealed step whose files do not match its manifest (missing or truncated) is
  damaged: it is moved, not deleted, to `<workdir>/corrupt_checkpoints/` with a
  warning, and the previous step is tried;
- a step whose files match (or that has no manifest: written by an older
  version, or killed in the instant between the rename and the seal) is
  restored; if orbax still fails (a permission error, a full disk, a library
  change), the run stops with one clear error and nothing is moved;
- a checkpoint that does not fit the run (another process count, model shape or
  config, see `train/resume.py`) is a configuration error, raised before
  anything is read into memory.

Restores go into abstract targets (`jax.ShapeDtypeStruct`s with shardings):
a restart never holds a freshly initialised state beside the restored one, and
sampling reads the parameters alone, onto whatever devices it has.
"""

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from attnres_jax.cli import ReportedError
from attnres_jax.files import write_json_atomically
from attnres_jax.train.steps import TrainState

MANIFEST = "commit_manifest.json"
_PROCESS_FILE = re.compile(r"process_\d+-of-(\d+)\.json")


class CheckpointRestoreError(ReportedError):
  """No checkpoint could be restored: one whose files are intact failed, or every one is damaged."""


class Checkpointer:
  """Saves and restores `TrainState` + data iterator + run config under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int, async_checkpointing: bool, read_only: bool = False):
    """`read_only` (sampling): damaged steps are skipped, not moved, and nothing is saved."""
    self.read_only = read_only
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.quarantine = os.path.join(os.path.abspath(workdir), "corrupt_checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "run": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_checkpointing, create=not read_only))
    self._unsealed: list[int] = []
    self._partial_reader: ocp.CheckpointManager | None = None  # reads the parameters alone

  def save(self, state: TrainState, data_iterator, run: Mapping[str, Any]) -> None:
    """Starts saving `state`, the iterator position and `run` (JSON: the config) at `state.step`."""
    step = int(state.step)
    if step in self.manager.all_steps():
      return
    if self._unsealed:  # orbax would wait for the previous save anyway: seal it first
      self.manager.wait_until_finished()
      self.seal_finished()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        run=ocp.args.JsonSave(dict(run))))
    self._unsealed.append(step)
    self.seal_finished()

  def seal_finished(self) -> None:
    """Writes the manifest of every save that has finished (process 0); cheap when none is pending."""
    if not self._unsealed or self.manager.is_saving_in_progress():
      return
    if jax.process_index() == 0:
      for step in self._unsealed:
        path = self._step_dir(step)
        if os.path.isdir(path):  # not already removed by max_to_keep
          _write_manifest(path)
    self._unsealed = []

  def restore_latest(self, target: TrainState, data_iterator=None,
                     check_run: Callable[[int, dict | None], None] | None = None) -> TrainState | None:
    """The newest intact checkpoint restored into `target`'s shapes and shardings, or None if there is none.

    `target` holds arrays or `jax.ShapeDtypeStruct`s with shardings. The iterator, if given, is restored
    in place, and the checkpoint must come from as many processes as this run has.
    `check_run(step, saved_run)` may refuse a checkpoint (ValueError) before anything is read;
    `saved_run` is None for checkpoints without a `run` item.
    """
    for step in self._intact_steps():
      if data_iterator is not None:
        self._check_process_count(step)
      if check_run is not None:
        check_run(step, self._read_run(step))
      self._check_shapes(step, target.params)
      items = dict(state=ocp.args.StandardRestore(jax.tree.map(_abstract, target)))
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      return self._restore(self.manager, step, items)["state"]
    return None

  def restore_params(self, target_params) -> tuple[int, Any] | None:
    """(step, parameters) of the newest intact checkpoint, read into `target_params`' shapes and shardings.

    The optimiser state, iterator and RNG are not read: a sampling machine needs a third of the memory
    and any device layout, whatever mesh trained the run.
    """
    for step in self._intact_steps():
      self._check_shapes(step, target_params)
      target = {"params": target_params}
      restore_args = jax.tree.map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
      items = dict(state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
      if self._partial_reader is None:
        self._partial_reader = ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(create=False))
      return step, self._restore(self._partial_reader, step, items)["state"]["params"]
    return None

  def _intact_steps(self) -> Iterator[int]:
    """Saved steps, newest first; a damaged one is moved aside (or, read-only, left) with a warning and skipped.

    If every step is damaged the run stops rather than silently starting again from step 0.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      damage = self._damage(step)
      if damage:
        where = "left it in place" if self.read_only else f"moved it to {self._move_aside(step)}"
        logging.warning("Checkpoint at step %d is damaged (%s); %s and trying the previous one.", step, damage,
                        where)
        damaged.append(step)
        continue
      yield step
    if damaged:
      raise CheckpointRestoreError(
          f"Every checkpoint in {self.directory} is damaged (steps {damaged}; "
          + ("left in place" if self.read_only else f"moved to {self.quarantine}") + "). Nothing was deleted. "
          + ("" if self.read_only else "Run again to start this workdir from step 0, or move them back to retry."))

  def _restore(self, manager: ocp.CheckpointManager, step: int, items: dict) -> dict:
    """`manager.restore` of an intact step: any failure stops the run with one clear error, moving nothing."""
    try:
      return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax and tensorstore raise many types; the files were checked before
      sealed = os.path.isfile(os.path.join(self._step_dir(step), MANIFEST))
      raise CheckpointRestoreError(
          f"Restoring the checkpoint at step {step} ({self._step_dir(step)}) failed: "
          f"{type(error).__name__}: {error}. "
          + ("Its files match the manifest written when it was saved, so it is not damaged: "
             if sealed else "It has no manifest (an older version wrote it), so it is not judged damaged: ")
          + "look for a permission, disk or library problem. Nothing was moved; to fall back to an "
          f"earlier checkpoint on purpose, move {self._step_dir(step)} out of {self.directory}.") from error

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _damage(self, step: int) -> str | None:
    """What is wrong with a sealed step's files (missing, truncated), or None if they match or it is unsealed.

    Errors other than a missing file (permissions, I/O) propagate: they say nothing about the checkpoint.
    """
    path = self._step_dir(step)
    try:
      with open(os.path.join(path, MANIFEST), encoding="utf-8") as file:
        manifest = json.load(file)
    except FileNotFoundError:
      return None
    except json.JSONDecodeError:  # written atomically, so only damage can make it unreadable
      return f"{MANIFEST} does not parse"
    for name, size in manifest["files"].items():
      try:
        found = os.path.getsize(os.path.join(path, name))
      except FileNotFoundError:
        return f"{name} is missing"
      if found != size:
        return f"{name} has {found} bytes, {size} were written"
    return None

  def _check_process_count(self, step: int) -> None:
    data_dir = os.path.join(self._step_dir(step), "data")
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    counts = {int(m.group(1)) for m in map(_PROCESS_FILE.fullmatch, names) if m}
    if counts and counts != {jax.process_count()}:
      raise ValueError(
          f"The checkpoint at step {step} in {self.directory} was written by {sorted(counts)[0]} process(es); "
          f"this run has {jax.process_count()}. Each process saved its own data-iterator position, so the run "
          f"resumes only with the same number of processes (the mesh and device count may differ). "
          f"Nothing was changed.")

  def _read_run(self, step: int) -> dict | None:
    if not os.path.isdir(os.path.join(self._step_dir(step), "run")):
      return None
    return self._restore(self.manager, step, dict(run=ocp.args.JsonRestore()))["run"]

  def _check_shapes(self, step: int, target_params) -> None:
    try:
      stored = self.manager.item_metadata(step)["state"].tree["params"]
    except Exception:  # unreadable metadata: let the restore attempt decide
      return
    stored_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(_as_dict(stored)).items()}
    wanted_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(_as_dict(target_params)).items()}
    if stored_shapes != wanted_shapes:
      differing = sorted(set(stored_shapes.items()) ^ set(wanted_shapes.items()))[:6]
      raise ValueError(
          f"The checkpoint at step {step} in {self.directory} was trained with a different model shape than "
          f"config.model describes (first differences, as (parameter path, shape): {differing}). Use the "
          f"config saved in the workdir (config.json) or a new --workdir; the checkpoint is left untouched.")

  def _move_aside(self, step: int) -> str:
    """Process 0 moves the damaged step out of the manager's directory; the others wait for it."""
    destination = os.path.join(self.quarantine, f"{step}")
    if jax.process_index() == 0:
      os.makedirs(self.quarantine, exist_ok=True)
      destination = f"{destination}-{int(time.time())}"
      shutil.move(self._step_dir(step), destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()
    return destination

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self.seal_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()
    if self._partial_reader is not None:
      self._partial_reader.close()


def _write_manifest(path: str) -> None:
  """`commit_manifest.json` in a finished step directory: every file's size, written atomically."""
  files = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      files[os.path.relpath(full, path)] = os.path.getsize(full)
  write_json_atomically(os.path.join(path, MANIFEST), {"files": files})


def _abstract(leaf) -> jax.ShapeDtypeStruct:
  """A restore target leaf: shape, dtype and sharding of an array or ShapeDtypeStruct."""
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def _as_dict(tree) -> dict:
  """Nested plain dicts of a params tree or of its orbax metadata (string keys, no Variable `value` level)."""
  if hasattr(tree, "to_pure_dict"):
    tree = tree.to_pure_dict()
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return _as_dict(tree["value"])
    return {str(k): _as_dict(v) for k, v in tree.items()}
  return tree
