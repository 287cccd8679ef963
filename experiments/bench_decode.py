"""Prefill time and per-token decode latency of Full and Block AttnRes against PreNorm.

Each model decodes with the jitted `Generator` (KV cache of `--window`
positions, greedy sampling so that every variant does the same work); the
variants are timed in interleaved rounds and ratios are of medians against
`prenorm` of the same shape in the same run. The paper reports
< 2 % inference latency overhead for Block AttnRes (docs/method.md §6).

  python -m experiments.bench_decode --sublayers=16 --d_model=256   # from the repository root
"""

import argparse
import statistics
import time

import jax
from flax import nnx

from attnres_jax import Transformer, cli
from attnres_jax.generate import Generator, Sampling
from experiments.bench_step import add_variant_arguments, block_size_label, model_config, print_header


class DecodeTimer:
  """One model's jitted prefill and decode step, compiled on construction, timed one call at a time."""

  def __init__(self, config, batch: int, prompt_length: int, window: int):
    self.generator = Generator(Transformer(config, rngs=nnx.Rngs(0)), window, Sampling(temperature=0.0))
    self.prompt = jax.random.randint(jax.random.key(1), (batch, prompt_length), 0, config.vocab_size)
    self.key = jax.random.key(0)
    self.prefill_s, self.decode_s = [], []
    self.tokens, self.cache = jax.block_until_ready(self._prefill())
    jax.block_until_ready(self._decode())

  def _prefill(self):
    return self.generator.prefill(self.generator.state, self.prompt, self.key)

  def _decode(self):
    self.tokens, self.cache = self.generator.decode_step(self.generator.state, self.cache, self.tokens, self.key)
    return self.tokens

  def time_round(self, decode_steps: int) -> None:
    start = time.perf_counter()
    self.tokens, self.cache = jax.block_until_ready(self._prefill())
    self.prefill_s.append(time.perf_counter() - start)
    for _ in range(decode_steps):
      start = time.perf_counter()
      jax.block_until_ready(self._decode())
      self.decode_s.append(time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sublayers", default="16,32", help="comma-separated sublayer counts L")
  parser.add_argument("--d_model", type=int, default=256)
  add_variant_arguments(parser, "prenorm,full,block,block_two_phase")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_length", type=int, default=128)
  parser.add_argument("--window", type=int, default=512, help="KV-cache positions")
  parser.add_argument("--new_tokens", type=int, default=64, help="decode steps timed per variant (median)")
  parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of one prefill and some steps")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
  args = parser.parse_args()
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, prompt {args.prompt_length}, "
        f"window {args.window}, d {args.d_model}, {args.dtype}, Block N = {args.num_blocks}")
  print_header("| L | residual | S | prefill ms | x base | decode ms/token | x base |")
  for num_sublayers in map(int, args.sublayers.split(",")):
    configs = {residual: model_config(residual, num_sublayers, args.d_model, args.num_blocks, remat="none",
                                      dtype=args.dtype)
               for residual in args.residuals}
    timers = {residual: DecodeTimer(config, args.batch, args.prompt_length, args.window)
              for residual, config in configs.items()}
    for _ in range(args.rounds):  # interleaved, so that drifts of the machine hit every variant alike
      for timer in timers.values():
        timer.time_round(args.new_tokens // args.rounds)
    median = {residual: (statistics.median(t.prefill_s), statistics.median(t.decode_s))
              for residual, t in timers.items()}
    base_prefill, base_decode = median["prenorm"]
    for residual, (prefill_s, decode_s) in median.items():
      print(f"| {num_sublayers} | {residual} | {block_size_label(configs[residual])} | {1e3 * prefill_s:.1f} "
            f"| {prefill_s / base_prefill:.2f} | {1e3 * decode_s:.2f} | {decode_s / base_decode:.2f} |", flush=True)


if __name__ == "__main__":
  cli.run_argparse(main)
