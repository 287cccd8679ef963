"""Training pipeline: optimiser pieces, the loop's outputs, and its reliability guarantees."""

import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax import data
from attnres_jax.config_checks import check_run_config
from attnres_jax.sharding import make_mesh
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.state import create_train_state
from attnres_jax.train.flops import forward_flops_per_token, peak_flops_per_device
from attnres_jax.train.loop import train_and_evaluate
from attnres_jax.train.metrics import read_metrics
from attnres_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from attnres_jax.train.steps import init_train_state, make_train_step
from configs import smoke
from helpers import make_model, random_tokens, run_main


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("corpus_cache"))


def smoke_config(cache_dir, **train):
  config = smoke.get_config()
  config.data.cache_dir = cache_dir
  config.train.update(train)
  return config


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if r["split"] == "train"}


def test_schedules_warm_up_then_decay():
  optim = smoke.get_config().optim
  optim.update(dict(peak_lr=1.0, warmup_steps=10, min_lr_ratio=0.1))
  cosine = learning_rate_schedule(optim, 100)
  assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(100)) == pytest.approx(0.1) and float(cosine(50)) < 1.0
  optim.update(dict(schedule="wsd", wsd_decay_fraction=0.2))
  wsd = learning_rate_schedule(optim, 100)
  assert [float(wsd(s)) for s in (10, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
  assert float(wsd(90)) == pytest.approx(0.55) and float(wsd(100)) == pytest.approx(0.1)


def decayed_names(params, decay_embeddings):
  leaves, _ = jax.tree_util.tree_flatten_with_path(decay_mask(params, decay_embeddings))
  dict_keys = lambda path: [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return {"/".join(dict_keys(path)) for path, decays in leaves if decays}


def test_weight_decay_mask_by_name():
  params = nnx.state(make_model("block"), nnx.Param)
  matrices = {f"layers/{module}/{name}" for module, names in (("attention", ("query", "key", "value", "out")),
                                                               ("mlp", ("gate", "up", "down"))) for name in names}
  assert decayed_names(params, decay_embeddings=False) == matrices
  assert decayed_names(params, decay_embeddings=True) == matrices | {"embedding", "head"}


def test_gradient_accumulation_equals_one_big_batch():
  graphdef, params = nnx.split(make_model("block"), nnx.Param)
  tx = optax.sgd(0.1)
  tokens = random_tokens(batch=4, length=9)
  fresh_state = lambda: init_train_state(jax.tree.map(jnp.copy, params), tx, 0)  # steps donate their state
  one = make_train_step(graphdef, tx, 1)(fresh_state(), tokens)
  two = make_train_step(graphdef, tx, 2)(fresh_state(), tokens)
  np.testing.assert_allclose(one[1]["loss"], two[1]["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one[0].params), jax.tree.leaves(two[0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_flop_count_orders_the_rules():
  config = smoke.get_config().model
  counts = {}
  for residual, block_size in (("prenorm", 1), ("block", 2), ("full", 1)):
    config.update(dict(residual=residual, block_size=block_size))
    counts[residual] = forward_flops_per_token(config, 32)
  assert counts["prenorm"]["depth"] == 0
  assert 0 < counts["block"]["depth"] < counts["full"]["depth"]
  assert counts["prenorm"]["matmul"] == counts["full"]["matmul"]
  config.update(dict(residual="full", depth_query_projection=True))
  extra = forward_flops_per_token(config, 32)["depth"] - counts["full"]["depth"]
  assert extra == 2 * config.d_model**2 * 2 * config.num_layers
  config.update(dict(residual="mhc", depth_query_projection=False))
  assert forward_flops_per_token(config, 32)["depth"] > 0


@pytest.mark.parametrize("section,field,value", [
    ("data", "source", "web"), ("data", "seq_len", 0), ("data", "val_fraction", 1.5),
    ("data", "global_batch_size", 5),  # not divisible by grad_accum_steps=2
    ("optim", "schedule", "linear"), ("optim", "peak_lr", 0.0), ("optim", "b2", 1.5),
    ("train", "num_steps", 0), ("train", "eval_every", -1),
    ("optim", "warmup_steps", 12),  # no steps left after warmup
    ("data", "seed", -1),
    ("model", "param_dtype", "bfloat16"),  # AdamW without float32 master weights
    ("model", "depth_attention_impl", "pallas"),  # no accelerator to compile the kernel for
    ("train", "resume_accept_changes", "data.paht"),
    ("model", "attention_impl", "flash"), ("model", "attention_impl", "splash"),  # splash: TPU only
    ("train", "loss_chunk_size", -8), ("train", "loss_chunk_size", 24),  # 24 does not divide seq_len
    ("train", "profile_steps", "5"), ("train", "profile_steps", "0:2"), ("train", "profile_steps", "3:2"),
])
def test_invalid_run_config_names_the_field(section, field, value):
  config = smoke.get_config()
  config.optim.grad_accum_steps = 2
  config[section][field] = value
  with pytest.raises(ValueError, match=rf"config\.{section}\.{field}="):
    check_run_config(config)


def test_resume_accept_changes_takes_existing_fields():
  config = smoke.get_config()
  config.train.resume_accept_changes = "optim.peak_lr, data.path,model.d_model"
  check_run_config(config)


def test_float64_without_x64_is_refused():
  config = smoke.get_config()
  config.model.dtype = "float64"
  with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
    check_run_config(config)


def test_pallas_on_cpu_names_the_interpreted_kernel():
  config = smoke.get_config()
  config.model.depth_attention_impl = "pallas"
  with pytest.raises(ValueError, match="pallas_interpret"):
    check_run_config(config, platform="cpu")
  check_run_config(config, platform="gpu")


def test_mfu_peak_follows_the_compute_dtype():
  device = lambda kind: type("FakeDevice", (), {"device_kind": kind})()
  assert peak_flops_per_device(device("NVIDIA H100 80GB HBM3"), "bfloat16") == 989e12
  assert peak_flops_per_device(device("NVIDIA H100 80GB HBM3"), "float32") == 495e12  # TF32 tensor cores
  assert peak_flops_per_device(device("TPU v5p"), "float32") == 459e12  # default precision: bf16 passes
  assert peak_flops_per_device(device("NVIDIA H100 80GB HBM3"), "float64") is None
  assert peak_flops_per_device(device("cpu"), "float32") is None


def test_smoke_run_writes_metrics_plot_checkpoints(tmp_path, corpus_cache):
  workdir = str(tmp_path / "run")
  final = train_and_evaluate(smoke_config(corpus_cache), workdir)
  records = read_metrics(workdir)
  evals = [r["loss"] for r in records if r["split"] == "eval"]
  assert len(evals) == 2 and evals[-1] == pytest.approx(final["eval_loss"])
  assert evals[-1] < np.log(256) - 0.1  # learned something beyond uniform bytes
  assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(records[-1])
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 10_000
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["residual"] == "block"
  assert any(f.startswith("events") for _, _, files in os.walk(os.path.join(workdir, "tensorboard")) for f in files)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]


def test_sigkill_then_rerun_reproduces_every_loss(tmp_path, corpus_cache):
  overrides = ["--config.train.num_steps=20", "--config.train.log_every=1", "--config.train.checkpoint_every=5",
               "--config.model.residual=block", "--config.model.block_size=3"]
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  overrides.append(f"--config.data.cache_dir={corpus_cache}")
  code, output = run_main(reference, *overrides)
  assert code == 0, output
  process = run_main(killed, *overrides, wait=False)
  deadline = time.time() + 240
  while time.time() < deadline and max(_logged_steps(killed), default=0) < 12:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert 12 <= max(_logged_steps(killed)) < 20, "the run was not killed mid-way"
  code, output = run_main(killed, *overrides)
  assert code == 0, output
  assert "(resumed)" in output
  assert train_losses(killed) == train_losses(reference)


def _logged_steps(workdir):
  try:
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def test_corrupt_latest_checkpoint_falls_back_and_keeps_it(tmp_path, corpus_cache):
  workdir = str(tmp_path / "run")
  train_and_evaluate(smoke_config(corpus_cache, log_every=1), workdir)
  losses = train_losses(workdir)
  latest = os.path.join(workdir, "checkpoints", "12", "state")
  for root, _, files in os.walk(latest):
    for name in files:
      if name not in ("_METADATA", "_CHECKPOINT_METADATA"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  train_and_evaluate(smoke_config(corpus_cache, log_every=1), workdir)  # same schedule as the first run
  moved = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
  assert len(moved) == 1 and moved[0].startswith("12-")
  resumed = train_losses(workdir)
  assert min(resumed) == 9  # resumed from step 8
  assert all(resumed[s] == losses[s] for s in range(9, 13))


def test_non_finite_loss_stops_and_keeps_good_checkpoints(tmp_path, corpus_cache):
  workdir = str(tmp_path / "run")
  config = smoke_config(corpus_cache, log_every=1, checkpoint_every=1, num_steps=12)
  config.optim.update(dict(peak_lr=1e12, warmup_steps=0, grad_clip_norm=0.0))
  with pytest.raises(FloatingPointError, match=r"at step (\d+)") as raised:
    train_and_evaluate(config, workdir)
  bad_step = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert all(step < bad_step for step in saved)
  if saved:  # what was kept is good: it restores to finite parameters
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, config.train.num_steps)
    _, target = create_train_state(config, mesh, tx)
    iterator = data.train_iterator(np.arange(1000) % 256, seq_len=32, global_batch_size=4, seed=0)
    kept = Checkpointer(workdir, max_to_keep=3, async_checkpointing=False).restore_latest(target, iterator)
    assert int(kept.step) == saved[-1]
    assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(kept.params))


def test_model_shape_mismatch_is_one_clear_error(tmp_path, corpus_cache):
  workdir = str(tmp_path / "run")
  train_and_evaluate(smoke_config(corpus_cache, num_steps=4), workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(checkpoints) for f in fs}
  config = smoke_config(corpus_cache, num_steps=8)
  config.model.d_model = 64
  with pytest.raises(ValueError, match=r"another config \(model\.d_model: 32 -> 64; "):
    train_and_evaluate(config, workdir)
  after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(checkpoints) for f in fs}
  assert before == after
