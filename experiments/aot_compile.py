"""Will it fit? The real train step compiled ahead of time for a TPU slice, on any machine (docs/method.md §13).

  python -m experiments.aot_compile --config=configs/scaling.py:paper-436M --topology=v5p:4x4x2 \
      --config.mesh.data=1 --config.mesh.fsdp=-1

For each `--residuals` variant the train step of `attnres_jax.train` (its
optimiser, state shardings and `make_train_step`, with the config's loss chunks
and micro-batches) is lowered with abstract arguments for the slice's chips
(`jax.experimental.topologies`; libtpu must be installed, no TPU is needed)
and compiled by the TPU compiler. One markdown row per variant: per-chip
arguments, temp and total memory against the chip's HBM; the compiler's FLOPs,
bytes accessed and estimated step time (`optimal_seconds`); and the model-FLOP
MFU that estimate implies; each as a ratio to PreNorm.

The compiler costs a Pallas kernel by the bytes it moves only, so where token
attention is the splash kernel its FLOPs (forward, the remat replay and the
backward, as the model FLOPs count them) are added at the chip's peak: the
`attention ms` column, a lower bound on the kernel's time.

The compiler's cost analysis counts a loop body once, not once per iteration,
so the costs come from a second compile with every layer, loss-chunk and
micro-batch loop unrolled (`model.unroll_layers`); memory comes from the
scanned program, the one training runs. `--nocosts` skips the second compile
(it takes several times longer).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from attnres_jax import cli
from attnres_jax.config_checks import DEPTH_DEFAULTS, check_run_config
from attnres_jax.model.attention_kernels import auto_impl
from attnres_jax.sharding import activate, batch_sharding, check_mesh_fits, make_mesh, replication_warnings
from attnres_jax.train.flops import (forward_flops_per_token, hbm_bytes_per_device, peak_flops_per_device,
                                     train_flops_per_token)
from attnres_jax.train.optim import make_optimizer
from attnres_jax.train.state import abstract_train_state, state_shardings
from attnres_jax.train.steps import make_train_step
from experiments.bench_step import VARIANTS, block_size_label, print_header

RESIDUALS = ("prenorm", "full", "block", "block_two_phase")
GiB = 2**30

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x2", "TPU slice, e.g. v5e:2x2, v5p:4x4x2, v6e:4x4 "
                                "(one device per chip; v4 is not supported).")
_RESIDUALS = flags.DEFINE_list("residuals", ",".join(RESIDUALS), f"variants, PreNorm first; of {list(VARIANTS)}")
_COSTS = flags.DEFINE_boolean("costs", True, "also compile with loops unrolled for FLOPs and step time")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass(frozen=True)
class Compiled:
  """Per-chip memory of the scanned program and, if compiled unrolled, the compiler's costs."""

  arguments: int
  temp: int
  total: int  # arguments + outputs + temp - donated (aliased) outputs
  flops: float | None = None
  bytes_accessed: float | None = None
  seconds: float | None = None


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """`config` with the residual rule of `VARIANTS[variant]`; depth fields reset where there is no depth mixing."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update({"two_phase": False, **VARIANTS[variant]})
  if config.model.residual in ("prenorm", "mhc"):
    config.model.update(DEPTH_DEFAULTS)
  return config


def slice_devices(topology: str) -> list[jax.Device]:
  """The abstract chips of a TPU slice; a clear error for a name libtpu does not know."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu: no TPU metadata server to ask on this machine
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # and other processes may hold libtpu too
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu raises RuntimeError / XlaRuntimeError with its own text
    raise ValueError(f"--topology={topology}: not a TPU slice libtpu can describe ({e}); "
                     "e.g. v5e:2x2, v5p:4x4x2, v6e:4x4 (and libtpu must be installed: pip install 'jax[tpu]')"
                     ) from e


def compiler_costs(compiled) -> dict[str, float]:
  """The compiler's cost analysis of a compiled program (`flops`, `bytes accessed`, `optimal_seconds`)."""
  costs = compiled.cost_analysis()
  return costs[0] if isinstance(costs, (list, tuple)) else costs  # a list of one dict on older jax


def compile_train_step(config: ml_collections.ConfigDict, devices: list[jax.Device], *, unrolled: bool) -> Compiled:
  """Memory and compiler costs of the train step of `config` compiled for `devices`; with `unrolled`, every
  loop unrolled (only then are the costs those of the whole step)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.unroll_layers = unrolled
  mesh = make_mesh(config.mesh, devices)
  check_mesh_fits(config, mesh, process_count=1, process_of=lambda device: 0)
  tx = make_optimizer(config.optim, config.train.num_steps)
  with activate(mesh, config.mesh.rules):
    graphdef, state = abstract_train_state(config, mesh, tx)
    train_step = make_train_step(graphdef, tx, config.optim.grad_accum_steps, state_shardings(state),
                                 loss_chunk_size=config.train.loss_chunk_size, unroll=unrolled)
    batch = jax.ShapeDtypeStruct((config.data.global_batch_size, config.data.seq_len + 1), jnp.int32,
                                 sharding=batch_sharding(mesh, config.mesh.rules))
    compiled = train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
  costs = compiler_costs(compiled)
  return Compiled(memory.argument_size_in_bytes, memory.temp_size_in_bytes, total, flops=costs.get("flops"),
                  bytes_accessed=costs.get("bytes accessed"), seconds=costs.get("optimal_seconds"))


def measure(config: ml_collections.ConfigDict, devices: list[jax.Device], *, costs: bool) -> Compiled:
  """Memory of the scanned train step; with `costs`, FLOPs and time of the unrolled one (else none: the
  scanned program's count its loop bodies once)."""
  scanned = compile_train_step(config, devices, unrolled=False)
  if not costs:
    return dataclasses.replace(scanned, flops=None, bytes_accessed=None, seconds=None)
  unrolled = compile_train_step(config, devices, unrolled=True)
  return dataclasses.replace(unrolled, arguments=scanned.arguments, temp=scanned.temp, total=scanned.total)


def kernel_attention_seconds(config: ml_collections.ConfigDict, mesh, peak: float | None) -> float:
  """Seconds per step of token attention at the chip's peak where it runs as a Pallas kernel (which the
  compiler costs by its bytes only), else 0 (XLA attention is in the compiler's estimate)."""
  impl = config.model.attention_impl
  with activate(mesh, config.mesh.rules):
    impl = auto_impl(config.data.seq_len, config.model.dtype) if impl == "auto" else impl
  if impl != "splash" or peak is None:
    return 0.0
  passes = 3 + (config.model.remat != "none")  # forward, backward (2x), the remat replay of the forward
  per_token = passes * forward_flops_per_token(config.model, config.data.seq_len)["attention"]
  return per_token * config.data.global_batch_size * config.data.seq_len / mesh.size / peak


def format_row(variant: str, config, result: Compiled, baseline: Compiled, *, hbm: float | None,
               model_flops_per_chip: float, peak: float | None, attention_seconds: float) -> str:
  """One markdown row of the table `main` prints; the estimated step is the compiler's plus the kernel
  attention's `attention_seconds` (the same for every variant)."""
  ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.3f}"
  number = lambda x, scale, fmt: "-" if x is None else format(x / scale, fmt)
  step, base_step = (None if r.seconds is None else r.seconds + attention_seconds for r in (result, baseline))
  mfu = "-" if step is None or peak is None else f"{model_flops_per_chip / step / peak:.1%}"
  share = "-" if hbm is None else f"{result.total / hbm:.0%}"
  return (f"| {variant} | {block_size_label(config.model)} | {result.arguments / GiB:.2f} | {result.temp / GiB:.2f} "
          f"| {result.total / GiB:.2f} | {share} | {ratio(result.temp, baseline.temp)} "
          f"| {number(result.flops, 1e12, '.4g')} | {ratio(result.flops, baseline.flops)} "
          f"| {number(result.bytes_accessed, 1e9, '.4g')} | {attention_seconds * 1e3:.4g} "
          f"| {number(step, 1e-3, '.4g')} | {ratio(step, base_step)} | {mfu} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  variants = _RESIDUALS.value
  if not variants or variants[0] != "prenorm" or not set(variants) <= set(VARIANTS):
    raise app.UsageError(f"--residuals must start with prenorm (the baseline of the ratios) and name only "
                         f"{list(VARIANTS)}")
  configs = {variant: variant_config(_CONFIG.value, variant) for variant in variants}
  for config in configs.values():  # every variant's mistakes before the first (minutes-long) compile
    check_run_config(config, platform="tpu")
  devices = slice_devices(_TOPOLOGY.value)
  device, base = devices[0], configs["prenorm"]
  hbm, peak = hbm_bytes_per_device(device), peak_flops_per_device(device, base.model.dtype)
  tokens = base.data.global_batch_size * base.data.seq_len
  mesh = make_mesh(base.mesh, devices)
  print(f"# {_TOPOLOGY.value}: {len(devices)} x {device.device_kind} ({'?' if hbm is None else f'{hbm / GiB:.1f}'} "
        f"GiB HBM each), mesh {dict(mesh.shape)}, batch {base.data.global_batch_size} x {base.data.seq_len}, "
        f"{base.model.dtype}, attention {base.model.attention_impl}, loss chunk "
        f"{base.train.loss_chunk_size or '-'}, remat {base.model.remat}, jax {jax.__version__}")
  _, state = abstract_train_state(base, mesh, make_optimizer(base.optim, base.train.num_steps))
  for warning in replication_warnings(state.params):
    print(f"# {warning}")
  print_header("| residual | S | arguments GiB | temp GiB | total GiB | of HBM | x base temp | TFLOP | x base "
               "| GB accessed | attention ms | est. step ms | x base | est. MFU |")
  attention_seconds = kernel_attention_seconds(base, mesh, peak)
  baseline = None
  for variant, config in configs.items():
    result = measure(config, devices, costs=_COSTS.value)
    baseline = baseline or result
    model_flops = train_flops_per_token(config.model, config.data.seq_len) * tokens / len(devices)
    print(format_row(variant, config, result, baseline, hbm=hbm, model_flops_per_chip=model_flops, peak=peak,
                     attention_seconds=attention_seconds), flush=True)


if __name__ == "__main__":
  cli.run(main)
