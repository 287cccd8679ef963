"""Resuming: which config changes a checkpoint accepts, exact WSD extension, and restore failures that move nothing."""

import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from attnres_jax.train import loop
from attnres_jax.sharding import make_mesh
from attnres_jax.train.checkpoint import CheckpointRestoreError, Checkpointer
from attnres_jax.train.loop import train_and_evaluate
from attnres_jax.train.metrics import read_metrics
from attnres_jax.train.optim import make_optimizer
from attnres_jax.train.resume import ADDED_FIELDS, check_resume
from attnres_jax.train.state import abstract_train_state
from configs import smoke


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("corpus_cache"))


def smoke_with(**sections):
  """The smoke config with `sections` ({section: {field: value}}) applied."""
  config = smoke.get_config()
  for section, fields in sections.items():
    config[section].update(fields)
  return config


def saved_and_current(**sections):
  """The smoke config as a checkpoint saves it (JSON), and the current config with `sections` applied."""
  return json.loads(smoke.get_config().to_json_best_effort()), smoke_with(**sections)


def test_safe_changes_go_through_and_are_reported():
  saved, current = saved_and_current(train=dict(log_every=1, eval_every=3, checkpoint_every=2),
                                     mesh=dict(fsdp=2), model=dict(remat="none", two_phase=True),
                                     optim=dict(grad_accum_steps=2))
  assert check_resume(saved, current, step=4) == [
      "mesh.fsdp", "model.remat", "model.two_phase", "optim.grad_accum_steps", "train.checkpoint_every",
      "train.eval_every", "train.log_every"]


def test_changes_that_alter_the_run_are_refused_together():
  saved, current = saved_and_current(data=dict(seq_len=64, global_batch_size=8), optim=dict(peak_lr=1e-3),
                                     model=dict(d_model=64))
  with pytest.raises(ValueError) as refused:
    check_resume(saved, current, step=4)
  message = str(refused.value)
  for field in ("data.global_batch_size: 4 -> 8", "data.seq_len: 32 -> 64", "optim.peak_lr: 0.003 -> 0.001",
                "model.d_model: 32 -> 64"):
    assert field in message
  assert "resume_accept_changes=data.global_batch_size,data.seq_len,model.d_model,optim.peak_lr" in message


def test_a_checkpoint_older_than_new_fields_resumes_at_their_old_values():
  saved, current = saved_and_current()
  for section, fields in ADDED_FIELDS.items():
    for field in fields:
      del saved[section][field]
  assert check_resume(saved, current, step=4) == []
  current.data.document_masking = True  # not the old behaviour: refused
  with pytest.raises(ValueError, match="data.document_masking: False -> True"):
    check_resume(saved, current, step=4)


def test_fields_listed_on_purpose_go_through():
  saved, current = saved_and_current(data=dict(path="/elsewhere"), train=dict(resume_accept_changes="data.path"))
  assert check_resume(saved, current, step=4) == ["data.path"]


@pytest.mark.parametrize("schedule,step,allowed", [
    ("wsd", 50, True),  # stable phase: the steps taken keep their learning rate
    ("wsd", 90, False),  # the decay (from step 80) was already followed
    ("cosine", 5, True),  # still in warmup
    ("cosine", 50, False),  # the cosine curve would bend under the steps taken
])
def test_num_steps_may_change_only_where_past_learning_rates_stay(schedule, step, allowed):
  optim = dict(schedule=schedule, warmup_steps=10, wsd_decay_fraction=0.2)
  saved = json.loads(smoke_with(optim=optim, train=dict(num_steps=100)).to_json_best_effort())
  current = smoke_with(optim=optim, train=dict(num_steps=200))
  if allowed:
    assert check_resume(saved, current, step=step) == ["train.num_steps"]
  else:
    with pytest.raises(ValueError, match=r"train\.num_steps: 100 -> 200.*stable phase"):
      check_resume(saved, current, step=step)


def wsd_config(cache_dir, num_steps):
  config = smoke.get_config()
  config.data.cache_dir = cache_dir
  config.optim.update(dict(schedule="wsd", wsd_decay_fraction=0.25))
  config.train.update(dict(num_steps=num_steps, log_every=1, eval_every=100, dynamics_every=0))
  return config


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


def test_extending_a_wsd_run_in_its_stable_phase_equals_training_that_long(tmp_path, corpus_cache):
  extended, direct = str(tmp_path / "extended"), str(tmp_path / "direct")
  train_and_evaluate(wsd_config(corpus_cache, 12), extended)  # decay from step 9; checkpoints 4, 8, 12
  shutil.rmtree(os.path.join(extended, "checkpoints", "12"))  # as if stopped at step 8, in the stable phase
  train_and_evaluate(wsd_config(corpus_cache, 16), extended)
  train_and_evaluate(wsd_config(corpus_cache, 16), direct)
  resumed, want = train_losses(extended), train_losses(direct)
  assert all(resumed[step] == want[step] for step in range(9, 17))
  with pytest.raises(ValueError, match=r"train\.num_steps: 16 -> 20"):  # its decay is behind it now
    train_and_evaluate(wsd_config(corpus_cache, 20), extended)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_cache):
  """A finished 8-step WSD run (checkpoints 4 and 8), trained once; tests take copies."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train_and_evaluate(wsd_config(corpus_cache, 8), workdir)
  return workdir


@pytest.fixture
def workdir(trained_run, tmp_path):
  """A copy of the trained run to resume, damage or refuse."""
  return shutil.copytree(trained_run, str(tmp_path / "run"))


def snapshot(directory):
  return {os.path.join(root, name): os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(directory) for name in names}


def test_an_unrelated_restore_error_stops_the_run_and_moves_nothing(workdir, corpus_cache, monkeypatch):
  before = snapshot(workdir)

  def refuse(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "/mnt/shared/checkpoints/8/state/ocdbt.process_0")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", refuse)
  with pytest.raises(CheckpointRestoreError, match=r"step 8 .*PermissionError.*not damaged.*Nothing was moved"):
    train_and_evaluate(wsd_config(corpus_cache, 8), workdir)
  assert snapshot(workdir) == before and not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_a_missing_file_of_a_sealed_checkpoint_falls_back_to_the_previous_one(workdir, corpus_cache):
  manifest = json.load(open(os.path.join(workdir, "checkpoints", "8", "commit_manifest.json")))
  state_file = next(name for name in manifest["files"] if name.startswith("state/") and "ocdbt" in name)
  os.remove(os.path.join(workdir, "checkpoints", "8", state_file))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  train_and_evaluate(wsd_config(corpus_cache, 8), workdir)
  assert min(train_losses(workdir)) == 5  # resumed from step 4
  assert [name.split("-")[0] for name in os.listdir(os.path.join(workdir, "corrupt_checkpoints"))] == ["8"]


def test_a_restart_reads_the_checkpoint_without_initialising_a_state(workdir, corpus_cache, monkeypatch):
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))

  def no_fresh_state(*args, **kwargs):
    raise AssertionError("a restart built a fresh train state beside the restored one")

  monkeypatch.setattr(loop, "create_train_state", no_fresh_state)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  train_and_evaluate(wsd_config(corpus_cache, 8), workdir)
  assert sorted(train_losses(workdir)) == [5, 6, 7, 8]


def damage_every_checkpoint(workdir):
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_sharding"))


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(workdir, corpus_cache):
  damage_every_checkpoint(workdir)
  with pytest.raises(CheckpointRestoreError, match=r"Every checkpoint .* is damaged \(steps \[8, 4\]"):
    train_and_evaluate(wsd_config(corpus_cache, 8), workdir)
  assert sorted(name.split("-")[0] for name in os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == [
      "4", "8"]


def test_a_read_only_reader_skips_damage_without_moving_it(workdir, corpus_cache):
  """Sampling reads a workdir that a run may still be training in: it moves nothing."""
  config = wsd_config(corpus_cache, 8)
  os.remove(os.path.join(workdir, "checkpoints", "8", "state", "_sharding"))
  before = snapshot(workdir)
  _, abstract = abstract_train_state(config, make_mesh(config.mesh), make_optimizer(config.optim, 8))
  reader = Checkpointer(workdir, max_to_keep=3, async_checkpointing=False, read_only=True)
  step, _ = reader.restore_params(abstract.params)
  reader.close()
  assert step == 4 and snapshot(workdir) == before
