"""The train step compiles ahead of time for a TPU slice on this CPU machine (experiments/aot_compile.py)."""

import math
import os
import subprocess
import sys

import jax
import pytest

from attnres_jax.train.flops import train_flops_per_token
from attnres_jax.train.optim import make_optimizer
from attnres_jax.train.state import abstract_train_state
from configs import smoke
from experiments import aot_compile
from helpers import REPO


def tiny_config(residual: str = "prenorm", num_layers: int = 2):
  config = smoke.get_config()
  config.model.update(dict(residual=residual, num_layers=num_layers, d_model=64, num_heads=2, num_kv_heads=2,
                           d_ff=128, vocab_size=512))
  config.data.update(dict(seq_len=64, global_batch_size=8))
  config.mesh.update(dict(data=1, fsdp=-1))
  return config


@pytest.fixture(scope="module")
def chips():
  return aot_compile.slice_devices("v5e:2x2")


def test_costs_come_from_the_unrolled_program(chips):
  """The compiler counts a loop body once: the scanned program's FLOPs hardly grow with depth, the unrolled
  one's do, about as the layers' share of the model FLOPs (docs/method.md §13)."""
  flops = {(layers, unrolled): aot_compile.compile_train_step(tiny_config("block", layers), chips,
                                                               unrolled=unrolled).flops
           for layers in (2, 4) for unrolled in (False, True)}
  got = flops[4, True] / flops[2, True]
  want = train_flops_per_token(tiny_config("block", 4).model, 64) / train_flops_per_token(
      tiny_config("block", 2).model, 64)
  assert abs(got - want) < 0.25 * (want - 1), (got, want)
  assert flops[4, False] / flops[2, False] < 1 + 0.5 * (want - 1)


def test_arguments_are_the_sharded_train_state(chips):
  """Per-chip arguments: the parameters and AdamW moments split over the 4 chips (the TPU pads small arrays
  to its tiles, hence the slack), not whole on each."""
  config = tiny_config("full")
  result = aot_compile.compile_train_step(config, chips, unrolled=False)
  model = aot_compile.variant_config(config, "full")
  _, state = abstract_train_state(model, aot_compile.make_mesh(model.mesh, chips),
                                  make_optimizer(model.optim, model.train.num_steps))
  leaves = jax.tree.leaves(state)
  per_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  assert per_chip <= result.arguments <= min(2 * per_chip, whole / 2)
  assert result.total >= result.temp > 0


def run_tool(*arguments):
  env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  return subprocess.run([sys.executable, "-m", "experiments.aot_compile", "--config=configs/smoke.py",
                         "--config.mesh.data=1", "--config.mesh.fsdp=-1", *arguments],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # the command line end to end; the compiles themselves are tested above
def test_the_tool_prints_one_row_per_variant():
  process = run_tool("--topology=v5e:2x2", "--residuals=prenorm,block")
  assert process.returncode == 0, process.stderr[-3000:]
  rows = [line for line in process.stdout.splitlines() if line.startswith("| prenorm") or line.startswith("| block")]
  assert [row.split("|")[1].strip() for row in rows] == ["prenorm", "block"], process.stdout
  assert all(len(row.split("|")) == 15 and " - |" not in row.split("|", 3)[3] for row in rows), rows
  assert "TPU v5 lite" in process.stdout


def test_a_slice_libtpu_does_not_know_is_one_error():
  process = run_tool("--topology=v9z:2x2")
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert process.returncode == 1 and len(errors) == 1 and "--topology=v9z:2x2" in errors[0], process.stderr[-2000:]
