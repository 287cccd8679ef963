"""Step time, compile time and compiled temp memory of PreNorm, Full and Block AttnRes (direct and two-phase).

Each row is one fwd+bwd step (`value_and_grad` of the training objective,
`train.loss.training_loss`, remat as configured) at one depth and width; ratios are against `prenorm` at the same
depth and width, measured in the same run. Memory is XLA's compiled temp
allocation (`memory_analysis().temp_size_in_bytes`), which excludes
parameters, inputs and outputs. MFU is the model's training FLOPs
(`train/flops.py`, rematerialisation not counted) per second against the
device's dense peak for `--dtype`; "-" where the peak is not known (CPUs).

  python -m experiments.bench_step --sublayers=8,16,32 --d_models=256,512   # from the repository root
  python -m experiments.bench_step --sublayers=32 --d_models=1280 --batch=4 --seq_len=8192 \
    --dtype=bfloat16 --attention_impl=cudnn   # one GPU
  python -m experiments.bench_step --sublayers=16 --d_models=256 --residuals=prenorm,full,block --ffn=moe

`--ffn=moe` makes every FFN a Mixture-of-Experts layer whose experts a token
uses multiply as many weights as the dense SwiGLU (equal active parameters);
ratios are against PreNorm MoE, and a last row is the dense PreNorm of that
active width.
"""

import argparse
import statistics
import time
from typing import NamedTuple

import jax
from flax import nnx

from attnres_jax import Transformer, cli
from attnres_jax.model.attention_kernels import IMPLS
from attnres_jax.train.flops import peak_flops_per_device, train_flops_per_token
from attnres_jax.train.loss import training_loss
from configs import base


VARIANTS = {"prenorm": dict(residual="prenorm"), "full": dict(residual="full"), "block": dict(residual="block"),
            "block_two_phase": dict(residual="block", two_phase=True),
            # ablation baselines (docs/method.md §8)
            "mhc": dict(residual="mhc"), "denseformer": dict(residual="full", depth_logits="learned",
                                                            depth_normalization="none"),
            "full_input_dependent_query": dict(residual="full", depth_query_projection=True)}


class MoEShape(NamedTuple):
  """`--ffn=moe`'s experts: each `1 / (top_k + shared)` of the dense width, rounded up to 64 channels."""

  experts: int
  top_k: int
  shared: int

  def expert_width(self, dense_width: int) -> int:
    return -(-dense_width // (self.top_k + self.shared) // 64) * 64


def model_config(variant: str, num_sublayers: int, d_model: int, num_blocks: int, remat: str, *,
                 dtype: str = "float32", attention_impl: str = "xla", moe: MoEShape | None = None):
  """The benchmarked model: 64-channel heads, SwiGLU width about 8/3 d, Block S = L // N; with `moe`, every
  FFN an MoE whose experts are `1 / (top_k + shared)` of that width (equal active parameters)."""
  if num_sublayers < 2 or num_sublayers % 2:
    raise ValueError(f"--sublayers: {num_sublayers} must be even and >= 2 (attention + MLP per layer)")
  if d_model < 64 or d_model % 64:
    raise ValueError(f"--d_model(s): {d_model} must be a positive multiple of 64 (64-channel heads)")
  if num_blocks < 1:
    raise ValueError(f"--num_blocks={num_blocks}: must be >= 1")
  config = base.get_config().model
  config.update(dict(
      **VARIANTS[variant], num_layers=num_sublayers // 2, d_model=d_model, num_heads=d_model // 64,
      num_kv_heads=d_model // 64, d_ff=-(-8 * d_model // 3 // 64) * 64, remat=remat,
      block_size=max(1, num_sublayers // num_blocks), dtype=dtype, attention_impl=attention_impl))
  if moe is not None:
    config.update(dict(ffn="moe", d_ff=moe.expert_width(config.d_ff)))
    config.moe.update(dict(num_experts=moe.experts, top_k=moe.top_k, num_shared_experts=moe.shared))
  return config


def parse_variants(residuals: str) -> list[str]:
  """`--residuals`: comma-separated names of VARIANTS, PreNorm first (the baseline of every ratio)."""
  variants = residuals.split(",")
  if variants[0] != "prenorm" or not set(variants) <= set(VARIANTS):
    raise argparse.ArgumentTypeError(
        f"--residuals must start with prenorm (the baseline of the ratios) and name only {list(VARIANTS)}")
  return variants


def add_variant_arguments(parser: argparse.ArgumentParser, residuals: str) -> None:
  """The benchmarks' shared `--residuals` (parsed into a list of VARIANTS) and `--num_blocks` flags."""
  parser.add_argument("--residuals", type=parse_variants, default=residuals, help=f"of {list(VARIANTS)}")
  parser.add_argument("--num_blocks", type=int, default=8, help="Block AttnRes N; S = L // N")


def block_size_label(config) -> str:
  """The table's S column: sublayers per block, 1 for Full AttnRes, - without depth attention."""
  if config.residual in ("prenorm", "mhc"):
    return "-"
  return str(config.block_size if config.residual == "block" else 1)


def print_header(columns: str) -> None:
  """A markdown table header: `columns` is its first row."""
  print(columns)
  print("|" + "---|" * (columns.count("|") - 1))


def measure(config, batch: int, seq_len: int, steps: int) -> dict:
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, config.vocab_size)
  loss = lambda p, t: training_loss(nnx.merge(graphdef, p), t)[0]
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps + 1):  # the first call is a warm-up
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    times.append(time.perf_counter() - start)
  return dict(step_s=statistics.median(times[1:]), compile_s=compile_s,
              temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20)


def mfu_label(config, batch: int, seq_len: int, step_s: float) -> str:
  """Model FLOPs utilisation of one step against the device's peak for `config.dtype`, or "-" if unknown."""
  peak = peak_flops_per_device(jax.devices()[0], config.dtype)
  if not peak:
    return "-"
  return f"{100 * train_flops_per_token(config, seq_len) * batch * seq_len / step_s / peak:.1f}%"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sublayers", default="8,16,32", help="comma-separated sublayer counts L")
  parser.add_argument("--d_models", default="256,512")
  add_variant_arguments(parser, "prenorm,full,block,block_two_phase")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
  parser.add_argument("--attention_impl", default="xla", choices=IMPLS, help="token attention (model.attention_impl)")
  parser.add_argument("--ffn", default="swiglu", choices=["swiglu", "moe"],
                      help="moe: every FFN an MoE of equal active parameters; ratios against PreNorm MoE, and a "
                      "last row of the dense PreNorm of that active width")
  parser.add_argument("--experts", type=int, default=8, help="--ffn=moe: routed experts")
  parser.add_argument("--top_k", type=int, default=2, help="--ffn=moe: routed experts per token")
  parser.add_argument("--shared_experts", type=int, default=1, help="--ffn=moe: always-on experts")
  args = parser.parse_args()
  moe = MoEShape(args.experts, args.top_k, args.shared_experts) if args.ffn == "moe" else None
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, seq_len {args.seq_len}, "
        f"remat {args.remat}, {args.dtype}, attention {args.attention_impl}, Block N = {args.num_blocks}"
        + ("" if moe is None else f", MoE {moe.experts} experts, top-{moe.top_k}, {moe.shared} shared"))
  print_header("| L | d | residual | ffn | S | step ms | x base | compile s | x base | temp MiB | x base | MFU |")
  for num_sublayers in map(int, args.sublayers.split(",")):
    for d_model in map(int, args.d_models.split(",")):
      baseline = None
      rows = [(residual, model_config(residual, num_sublayers, d_model, args.num_blocks, args.remat,
                                      dtype=args.dtype, attention_impl=args.attention_impl, moe=moe))
              for residual in args.residuals]
      if moe is not None:  # the dense PreNorm multiplying as many weights per token
        dense = model_config("prenorm", num_sublayers, d_model, args.num_blocks, args.remat, dtype=args.dtype,
                             attention_impl=args.attention_impl)
        dense.d_ff = rows[0][1].d_ff * (moe.top_k + moe.shared)
        rows.append(("prenorm", dense))
      for name, config in rows:
        result = measure(config, args.batch, args.seq_len, args.steps)
        baseline = baseline or result
        ffn = f"{config.ffn} {config.d_ff}"
        print(f"| {num_sublayers} | {d_model} | {name} | {ffn} | {block_size_label(config)} "
              f"| {1e3 * result['step_s']:.1f} | {result['step_s'] / baseline['step_s']:.2f} "
              f"| {result['compile_s']:.1f} | {result['compile_s'] / baseline['compile_s']:.2f} "
              f"| {result['temp_mib']:.1f} | {result['temp_mib'] / baseline['temp_mib']:.2f} "
              f"| {mfu_label(config, args.batch, args.seq_len, result['step_s'])} |", flush=True)


if __name__ == "__main__":
  cli.run_argparse(main)
