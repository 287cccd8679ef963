"""The train step compiles ahead of time for a TPU slice on this CPU machine (experiments/aot_compile.py)."""

import math
import os
import subprocess
import sys

import jax
import pytest

from attnres_jax.kernels.depth_attention_op import batched_depth_attention
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


def buffer_config(residual: str):
  """bf16, 16 sublayers, a small vocabulary: the depth buffer is most of the memory."""
  config = tiny_config(residual, num_layers=8)
  config.model.update(dict(d_model=256, d_ff=512, dtype="bfloat16", remat="full", block_size=4))
  config.data.update(dict(seq_len=1024, global_batch_size=16))
  return aot_compile.variant_config(config, residual)


@pytest.mark.slow
def test_tpu_temp_memory_is_the_buffer_and_its_cotangent(chips):
  """Compiled for TPU, Block and Full AttnRes take at most 2.75 bf16 source buffers `[N, B, T, d]` of temp
  memory more than PreNorm: the final buffer the backward reads, its cotangent, and slack (measured 2.45 for
  Block, 2.32 for Full). A backward that adds each sublayer's source cotangents to the whole buffer's
  makes the compiler keep the sum between a layer's two sublayers as a third buffer: Block took 3.40
  (docs/method.md §7)."""
  slot_bytes = 16 // len(chips) * 1024 * 256 * 2
  prenorm = aot_compile.compile_train_step(buffer_config("prenorm"), chips, unrolled=False).temp
  for residual, num_slots in (("block", 4), ("full", 16)):
    temp = aot_compile.compile_train_step(buffer_config(residual), chips, unrolled=False).temp
    assert temp <= prenorm + 2.75 * num_slots * slot_bytes, (residual, (temp - prenorm) / (num_slots * slot_bytes))


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
  assert all(len(row.split("|")) == 16 and " - |" not in row.split("|", 3)[3] for row in rows), rows
  assert "TPU v5 lite" in process.stdout


def test_a_slice_libtpu_does_not_know_is_one_error():
  process = run_tool("--topology=v9z:2x2")
  errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
  assert process.returncode == 1 and len(errors) == 1 and "--topology=v9z:2x2" in errors[0], process.stderr[-2000:]


def test_kernel_attention_is_added_at_peak_only_where_it_is_a_kernel(chips):
  """The compiler costs a Pallas kernel by its bytes: splash attention's FLOPs (forward, replay, backward) are
  added at the chip's peak; XLA attention is in the compiler's own estimate."""
  config = tiny_config()
  mesh = aot_compile.make_mesh(config.mesh, chips)
  assert aot_compile.kernel_attention_seconds(config, mesh, peak=1e12) == 0.0
  config.model.attention_impl = "auto"  # splash on TPU: T = 64 is no multiple of its 128-token tile, so xla
  assert aot_compile.kernel_attention_seconds(config, mesh, peak=1e12) == 0.0
  config.data.seq_len = 128
  seconds = aot_compile.kernel_attention_seconds(config, mesh, peak=1e12)
  attention = aot_compile.forward_flops_per_token(config.model, 128)["attention"]
  assert seconds == pytest.approx(4 * attention * 8 * 128 / 4 / 1e12)


def test_depth_kernel_compiles_for_tpu_at_paper_shapes():
  """The Pallas depth kernel through the real Mosaic compiler for a v5p chip (64 MiB of VMEM) at paper-436M's
  per-chip shape, two-phase Block: 8 queries over 9 slots of 8 x 8192 tokens, d = 1168, bf16, forward and
  backward. Token tiles sized by their blocks alone (256 tokens here) overflowed VMEM by 4.5 MiB; the kernel's
  cost estimate reaches the compiler (it would otherwise count a fraction of the bytes)."""
  chip = aot_compile.slice_devices("v5p:2x2x1")[0]
  on_chip = jax.sharding.SingleDeviceSharding(chip)
  sources = jax.ShapeDtypeStruct((9, 65536, 1168), jax.numpy.bfloat16, sharding=on_chip)
  query_gains = jax.ShapeDtypeStruct((8, 1168), jax.numpy.float32, sharding=on_chip)

  def loss(sources, query_gains):
    mixtures, _ = batched_depth_attention(sources, 9, query_gains, None, 1e-6, "pallas")
    return jax.numpy.sum(mixtures.astype(jax.numpy.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(sources, query_gains).compile()
  costs = aot_compile.compiler_costs(compiled)
  slot_bytes = 65536 * 1168 * 2
  assert costs["bytes accessed"] >= (9 + 8 + 9 + 8 + 9) * slot_bytes  # each kernel's inputs and outputs, once


def test_an_expert_parallel_moe_train_step_compiles_for_tpu(chips):
  """An AttnRes MoE model with its experts split over an `expert` axis of 2 chips (megablox grouped matmuls,
  `moe.impl=auto` on TPU) compiles for a slice; each chip holds half of every expert stack."""
  config = tiny_config("block")
  config.model.update(dict(ffn="moe", d_ff=128))
  config.model.moe.update(dict(num_experts=4, top_k=2, dense_layers=1))
  config.mesh.update(dict(fsdp=2, expert=2))
  result = aot_compile.compile_train_step(config, chips, unrolled=False)
  assert result.total >= result.temp > 0
  _, state = abstract_train_state(config, aot_compile.make_mesh(config.mesh, chips),
                                  make_optimizer(config.optim, config.train.num_steps))
  gate = state.params["layers"]["mlp"]["gate"].get_value()
  assert gate.shape == (1, 4, 64, 128) and gate.sharding.shard_shape(gate.shape) == (1, 2, 32, 128)
