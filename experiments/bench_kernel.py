"""Pallas depth-attention kernel against its XLA reference: time and achieved bandwidth.

For each shape (S sources, Q queries, M tokens, width d, dtype) it times the
forward and forward+backward of the kernel and of the jnp reference (both
jitted, median of `--reps`), and reports the bytes each must move at least
(every input read once, every output written once) divided by the time, as a
share of the device's peak memory bandwidth. Ratios are kernel against
reference in the same run.

On CPU the kernel runs in the Pallas TPU interpreter: its times say nothing
about accelerator speed, and the default shapes are small.

With `--tpu_topology` nothing runs: both are compiled ahead of time for one
chip of that TPU slice (libtpu, any machine; docs/method.md §13) at the
per-chip shapes of the paper's sizes, and the table gives the TPU compiler's
estimated time, bytes accessed and temp memory. The real Mosaic compile is what
catches a kernel that overflows VMEM; the kernel tells the compiler its FLOPs
and bytes (`pl.CostEstimate`), which it otherwise counts only in part.

  python -m experiments.bench_kernel                        # from the repository root
  python -m experiments.bench_kernel --shapes=9,8,16384,2048,bfloat16
  python -m experiments.bench_kernel --tpu_topology=v5p:2x2x1
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from attnres_jax import cli
from attnres_jax.kernels.depth_attention_op import batched_depth_attention
from attnres_jax.kernels.depth_attention_pallas import Target, depth_attention_pallas
from experiments.aot_compile import compiler_costs, slice_devices

# Peak HBM bandwidth in bytes/s by `device_kind` prefix (vendor data sheets).
PEAK_BANDWIDTH = {
    "NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.04e12, "NVIDIA B200": 8.0e12,
    "TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11, "TPU v5p": 2.765e12, "TPU v6": 1.64e12,
}
ACCELERATOR_SHAPES = "9,8,16384,2048,bfloat16;9,1,16384,2048,bfloat16;9,8,16384,2048,float32;33,1,8192,1024,bfloat16"
CPU_SHAPES = "9,8,512,256,float32;9,1,1024,512,float32"
# Per chip at batch 256 x 8192 over 32 chips (M = 8 x 8192): paper-436M (d = 1168) two-phase Block (Q = S = 8
# queries over 9 slots), a direct mix (Q = 1), Full (32 slots), and paper-sized d = 2048.
TPU_SHAPES = ("9,8,65536,1168,bfloat16;9,1,65536,1168,bfloat16;32,1,65536,1168,bfloat16;"
              "9,8,65536,2048,bfloat16")


def peak_bandwidth(device: jax.Device) -> float | None:
  return next((peak for kind, peak in PEAK_BANDWIDTH.items() if device.device_kind.startswith(kind)), None)


def min_bytes(num_sources: int, num_queries: int, tokens: int, width: int, itemsize: int) -> tuple[int, int]:
  """Bytes the forward, and the forward plus backward, must move at least."""
  sources, mixtures = num_sources * tokens * width * itemsize, num_queries * tokens * width * itemsize
  lse = num_queries * tokens * 4
  forward = sources + mixtures + lse
  backward = 2 * sources + mixtures + lse  # read sources and both cotangents; write the source cotangents
  return forward, forward + backward


def median_seconds(fn, *args, reps: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def implementations(backend: str, target: Target | None):
  """(name, op(sources, num_valid, query_gains)) for the kernel and the reference."""
  def kernel(sources, num_valid, query_gains):
    if target is not None:
      return depth_attention_pallas(sources, num_valid, query_gains, 1e-6, target)
    impl = "pallas_interpret" if backend == "cpu" else "pallas"
    return batched_depth_attention(sources, num_valid, query_gains, None, 1e-6, impl)

  reference = lambda sources, num_valid, query_gains: batched_depth_attention(
      sources, num_valid, query_gains, None, 1e-6, "xla")
  return [("kernel", kernel), ("xla", reference)]


def compiled_costs(fn, *args) -> tuple[float, float, float]:
  """The TPU compiler's estimated milliseconds, GB accessed and temp GiB of `fn` at the abstract `args`."""
  compiled = jax.jit(fn).lower(*args).compile()
  costs = compiler_costs(compiled)
  return (costs["optimal_seconds"] * 1e3, costs["bytes accessed"] / 1e9,
          compiled.memory_analysis().temp_size_in_bytes / 2**30)


def tpu_table(topology: str, shapes: str) -> None:
  """Kernel and reference compiled for one chip of `topology`, forward and forward + backward, one row each."""
  chip = slice_devices(topology)[0]
  on_chip = jax.sharding.SingleDeviceSharding(chip)
  print(f"compiled for one {chip.device_kind} chip of {topology}, jax {jax.__version__}: estimates, nothing runs")
  print("| S | Q | M | d | dtype | pass | impl | est. ms | x xla | GB accessed | temp GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for spec in shapes.split(";"):
    s, q, m, d, dtype = spec.split(",")
    num_sources, num_queries, tokens, width, dtype = int(s), int(q), int(m), int(d), jnp.dtype(dtype)
    abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip)
    sources, query_gains = abstract((num_sources, tokens, width), dtype), abstract((num_queries, width), jnp.float32)
    d_mixtures, d_lse = abstract((num_queries, tokens, width), dtype), abstract((num_queries, tokens), jnp.float32)
    num_valid = abstract((), jnp.int32)
    for pass_name in ("fwd", "fwd+bwd"):
      costs = {}
      for name, op in implementations("tpu", None):
        if pass_name == "fwd":
          costs[name] = compiled_costs(op, sources, num_valid, query_gains)
        else:
          costs[name] = compiled_costs(forward_backward(op), sources, num_valid, query_gains, d_mixtures, d_lse)
      for name, (ms, gigabytes, temp) in costs.items():
        print(f"| {num_sources} | {num_queries} | {tokens} | {width} | {dtype.name} | {pass_name} | {name} | "
              f"{ms:.3f} | {costs['xla'][0] / ms:.2f} | {gigabytes:.2f} | {temp:.2f} |", flush=True)


def forward_backward(op):
  def run(sources, num_valid, query_gains, d_mixtures, d_lse):
    outputs, vjp = jax.vjp(lambda s, q: op(s, num_valid, q), sources, query_gains)
    return outputs, vjp((d_mixtures, d_lse))
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default=None, help="';'-separated S,Q,M,d,dtype (default depends on the backend)")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--peak_gbps", type=float, default=None, help="peak memory bandwidth, if not in the table")
  parser.add_argument("--triton_tile_elements", type=int, default=None, help="tuning: Triton [TM, d] tile size")
  parser.add_argument("--triton_num_warps", type=int, default=None, help="tuning: Triton warps per program")
  parser.add_argument("--tpu_topology", default=None,
                      help="compile for one chip of this TPU slice instead of running (e.g. v5p:2x2x1)")
  args = parser.parse_args()
  if args.tpu_topology:
    tpu_table(args.tpu_topology, args.shapes or TPU_SHAPES)
    return

  device = jax.devices()[0]
  backend = jax.default_backend()
  peak = args.peak_gbps * 1e9 if args.peak_gbps else peak_bandwidth(device)
  target = None
  if args.triton_tile_elements or args.triton_num_warps:
    target = Target("triton", triton_tile_elements=args.triton_tile_elements or Target("triton").triton_tile_elements,
                    triton_num_warps=args.triton_num_warps or Target("triton").triton_num_warps)
  shapes = args.shapes or (CPU_SHAPES if backend == "cpu" else ACCELERATOR_SHAPES)
  print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, peak bandwidth: "
        f"{f'{peak / 1e9:.0f} GB/s' if peak else 'unknown (--peak_gbps)'}")
  if backend == "cpu":
    print("CPU: the kernel runs in the Pallas interpreter; its times are NOT meaningful.")
  print("| S | Q | M | d | dtype | pass | impl | ms | x xla | GB/s | % peak |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for spec in shapes.split(";"):
    s, q, m, d, dtype = spec.split(",")
    num_sources, num_queries, tokens, width, dtype = int(s), int(q), int(m), int(d), jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    sources = jax.random.normal(keys[0], (num_sources, tokens, width), dtype)
    query_gains = 0.1 * jax.random.normal(keys[1], (num_queries, width), jnp.float32)
    d_mixtures = jax.random.normal(keys[2], (num_queries, tokens, width), dtype)
    d_lse = jax.random.normal(keys[3], (num_queries, tokens), jnp.float32)
    num_valid = jnp.int32(num_sources)
    forward_bytes, total_bytes = min_bytes(num_sources, num_queries, tokens, width, dtype.itemsize)
    for pass_name, nbytes in (("fwd", forward_bytes), ("fwd+bwd", total_bytes)):
      times = {}
      for name, op in implementations(backend, target):
        if pass_name == "fwd":
          times[name] = median_seconds(op, sources, num_valid, query_gains, reps=args.reps)
        else:
          times[name] = median_seconds(forward_backward(op), sources, num_valid, query_gains, d_mixtures, d_lse,
                                       reps=args.reps)
      for name, seconds in times.items():
        rate = nbytes / seconds
        share = f"{100 * rate / peak:.0f}" if peak else "-"
        print(f"| {num_sources} | {num_queries} | {tokens} | {width} | {dtype.name} | {pass_name} | {name} | "
              f"{1e3 * seconds:.3f} | {times['xla'] / seconds:.2f} | {rate / 1e9:.0f} | {share} |", flush=True)


if __name__ == "__main__":
  cli.run_argparse(main)
