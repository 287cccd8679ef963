"""Prefill time and per-token decode latency of Full and Block AttnRes against PreNorm.

Each model decodes with the jitted `Generator` (KV cache of `--window`
positions, greedy sampling so that every variant does the same work); ratios
are against `prenorm` of the same shape in the same run. The paper reports
< 2 % inference latency overhead for Block AttnRes (`attnres-spec.md` section 6).

  python -m experiments.bench_decode --sublayers=16 --d_model=256   # from the repository root
"""

import argparse
import statistics
import time

import jax
from flax import nnx

from attnres_jax import Transformer
from attnres_jax.generate import Generator, Sampling
from experiments.bench_step import VARIANTS, model_config, parse_variants, print_header


def measure(config, batch: int, prompt_length: int, window: int, new_tokens: int) -> dict:
  generator = Generator(Transformer(config, rngs=nnx.Rngs(0)), window, Sampling(temperature=0.0))
  prompt = jax.random.randint(jax.random.key(1), (batch, prompt_length), 0, config.vocab_size)
  key = jax.random.key(0)
  prefill_times = []
  for _ in range(4):  # the first call compiles
    start = time.perf_counter()
    tokens, cache = jax.block_until_ready(generator.prefill(generator.state, prompt, key))
    prefill_times.append(time.perf_counter() - start)
  step_times = []
  for _ in range(new_tokens + 1):  # the first step compiles
    start = time.perf_counter()
    tokens, cache = jax.block_until_ready(generator.decode_step(generator.state, cache, tokens, key))
    step_times.append(time.perf_counter() - start)
  return dict(prefill_s=statistics.median(prefill_times[1:]), decode_s=statistics.median(step_times[1:]))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sublayers", default="16,32", help="comma-separated sublayer counts L")
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--residuals", default="prenorm,full,block,block_two_phase", help=f"of {list(VARIANTS)}")
  parser.add_argument("--num_blocks", type=int, default=8, help="Block AttnRes N; S = L // N")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_length", type=int, default=128)
  parser.add_argument("--window", type=int, default=512, help="KV-cache positions")
  parser.add_argument("--new_tokens", type=int, default=64, help="decode steps timed (median)")
  args = parser.parse_args()
  residuals = parse_variants(args.residuals)
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, prompt {args.prompt_length}, "
        f"window {args.window}, d {args.d_model}, Block N = {args.num_blocks}")
  print_header("| L | residual | S | prefill ms | x base | decode ms/token | x base |")
  for num_sublayers in map(int, args.sublayers.split(",")):
    baseline = None
    for residual in residuals:
      config = model_config(residual, num_sublayers, args.d_model, args.num_blocks, remat="none")
      result = measure(config, args.batch, args.prompt_length, args.window, args.new_tokens)
      baseline = baseline or result
      block_size = {"prenorm": "-", "full": "1"}.get(residual, str(config.block_size))
      print(f"| {num_sublayers} | {residual} | {block_size} "
            f"| {1e3 * result['prefill_s']:.1f} | {result['prefill_s'] / baseline['prefill_s']:.2f} "
            f"| {1e3 * result['decode_s']:.2f} | {result['decode_s'] / baseline['decode_s']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
