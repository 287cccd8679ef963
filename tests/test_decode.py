"""KV-cache decoding equals the full forward; sampling filters; the sample CLI (docs/method.md §11)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnres_jax.generate import Generator, Sampling, sample_tokens
from attnres_jax.sample import load_model, load_run_config
from attnres_jax.train.resume import ADDED_FIELDS
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.model import kv_cache, transformer
from attnres_jax.train.loop import train_and_evaluate
from configs import smoke
from helpers import REPO, make_model, max_rel_error, random_tokens


def decode_one_by_one(model, tokens_BxT, prompt_length, window):
  """Logits of every position: one prefill of the prompt, then one cached step per token."""
  logits, cache = model.extend(tokens_BxT[:, :prompt_length], model.empty_cache(tokens_BxT.shape[0], window))
  steps = [logits]
  for t in range(prompt_length, tokens_BxT.shape[1]):
    logits, cache = model.extend(tokens_BxT[:, t:t + 1], cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("residual,block_size,two_phase", [
    ("prenorm", 1, False), ("full", 1, False), pytest.param("block", 2, False, marks=pytest.mark.slow),
    pytest.param("block", 3, False, marks=pytest.mark.slow), ("block", 3, True), ("mhc", 1, False)])
def test_cached_decoding_equals_full_forward_at_every_position(residual, block_size, two_phase):
  model = make_model(residual, block_size=block_size, two_phase=two_phase)
  tokens = random_tokens(length=11)
  assert max_rel_error(decode_one_by_one(model, tokens, 4, window=16), model(tokens)) < 1e-5


def test_ring_buffer_past_the_window_is_sliding_window_attention(monkeypatch):
  """Past `window` positions each layer attends to the last `window` keys: a banded causal mask."""
  model, tokens, window = make_model("block", block_size=3), random_tokens(length=13), 5
  got = decode_one_by_one(model, tokens, 2, window)

  def banded(cache, num_new):  # every position in its own slot, a query sees (p - window, p]
    positions, plan, positions_W = kv_cache.plan_write(cache, num_new)
    slots = jnp.arange(cache.window)[None]
    mask = (slots <= positions[:, None]) & (slots > positions[:, None] - window)
    return positions, plan._replace(mask_TxW=mask), positions_W

  monkeypatch.setattr(transformer, "plan_write", banded)
  want, _ = model.extend(tokens, model.empty_cache(2, tokens.shape[1]))
  assert max_rel_error(got, want) < 1e-5
  assert max_rel_error(want, model(tokens)) > 1e-2  # the window really cut something


def test_decode_step_compiles_once_and_greedy_generation_follows_argmax():
  model = make_model("block", block_size=3)
  generator = Generator(model, window=8, sampling=Sampling(temperature=0.0))
  prompt = random_tokens(batch=1, length=3)
  generated = np.stack(list(generator.generate(prompt, 12, seed=0)), axis=1)  # past the window too
  assert generator.decode_step._cache_size() == 1
  sequence = np.concatenate([prompt, generated], axis=1)
  want = np.argmax(decode_one_by_one(model, jnp.asarray(sequence), 3, window=8), axis=-1)[:, 2:-1]
  np.testing.assert_array_equal(generated, want)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
  draw = lambda sampling, n=4000: np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, sampling)[0])(
      jax.random.split(jax.random.key(0), n)))
  assert set(draw(Sampling(temperature=0.0), 10)) == {0}
  assert set(draw(Sampling(temperature=5.0, top_k=1), 100)) == {0}
  assert set(draw(Sampling(top_k=2))) == {0, 1}
  assert set(draw(Sampling(top_p=0.75))) == {0, 1}  # 0.5 < 0.75 <= 0.8: the two most likely
  assert set(draw(Sampling(top_p=0.5))) == {0}
  frequencies = np.bincount(draw(Sampling(), 20000), minlength=5) / 20000
  np.testing.assert_allclose(frequencies, np.exp(logits[0]), atol=0.015)
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0.0)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A run trained on a (2, 2, 2) mesh of 8 fake devices; `sample` runs on one."""
  workdir = str(tmp_path_factory.mktemp("sample_run"))
  config = smoke.get_config()
  config.data.cache_dir = str(tmp_path_factory.mktemp("corpus_cache"))
  config.train.update(num_steps=4, checkpoint_every=4, eval_every=4)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  train_and_evaluate(config, workdir)
  return workdir


def run_sample(*flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "attnres_jax.sample", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=env)


def test_sample_cli_prints_prompt_and_continuation(trained_workdir):
  result = run_sample(f"--workdir={trained_workdir}", "--prompt=def ", "--max_new_tokens=40", "--temperature=0")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("def ") and len(result.stdout.encode("utf-8", "replace")) >= 4 + 40 // 3
  assert "step 4" in result.stderr and "parameters only, on 1 device" in result.stderr
  again = run_sample(f"--workdir={trained_workdir}", "--prompt=def ", "--max_new_tokens=40", "--temperature=0")
  assert again.stdout == result.stdout  # greedy is deterministic


def test_sampling_reads_the_parameters_alone(trained_workdir, monkeypatch):
  """What the restore brings into memory is the parameters, not the optimiser state (twice their size)."""
  read_bytes, restore = [], Checkpointer._restore

  def recording(self, manager, step, items):
    restored = restore(self, manager, step, items)
    arrays = jax.tree.leaves([restored[name] for name in items])
    read_bytes.append(sum(x.nbytes for x in arrays if isinstance(x, jax.Array)))
    return restored

  monkeypatch.setattr(Checkpointer, "_restore", recording)
  model, step = load_model(trained_workdir, load_run_config(trained_workdir))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert step == 4 and read_bytes == [sum(x.nbytes for x in params)]
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in params)


def test_sample_cli_errors(trained_workdir, tmp_path):
  result = run_sample(f"--workdir={tmp_path}")
  assert result.returncode != 0 and "no config.json" in result.stderr
  os.makedirs(tmp_path / "copy")
  with open(os.path.join(trained_workdir, "config.json")) as f, open(tmp_path / "copy" / "config.json", "w") as g:
    g.write(f.read())
  result = run_sample(f"--workdir={tmp_path / 'copy'}")
  assert result.returncode != 0 and "no checkpoint" in result.stderr
  result = run_sample(f"--workdir={trained_workdir}", "--prompt=" + "x" * 33)  # smoke seq_len is 32
  assert result.returncode != 0 and "1 to 32" in result.stderr


def test_a_workdir_written_before_newer_config_fields_still_loads(trained_workdir, tmp_path):
  """A config.json without the fields added since (`resume.ADDED_FIELDS`) loads with the values that
  reproduce its run."""
  shutil.copytree(trained_workdir, tmp_path / "old")
  path = tmp_path / "old" / "config.json"
  saved = json.loads(path.read_text())
  for section, fields in ADDED_FIELDS.items():
    for field in fields:
      del saved[section][field]
  path.write_text(json.dumps(saved))
  config = load_run_config(str(tmp_path / "old"))
  assert config.model.attention_impl == "xla" and config.train.loss_chunk_size == 0
  model, step = load_model(str(tmp_path / "old"), config)
  assert step == 4
