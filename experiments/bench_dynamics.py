"""Cost of logging training dynamics (`attnres_jax/train/dynamics.py`) against the training step it rides on.

For each residual rule: the median jitted train step (donated state, as in
training), the median dynamics step on the same batch, and the host time of
writing one record (JSONL + TensorBoard). The amortised overhead is
`(dynamics + write) / (every * train step)`; the train step itself does not
change. Ratios of the train step are against `prenorm` in the same run.

  python -m experiments.bench_dynamics --sublayers=16 --d_model=256 --every=100   # from the repository root
"""

import argparse
import statistics
import tempfile
import time

import jax
import optax
import tensorboardX
from flax import nnx

from attnres_jax import Transformer, cli
from attnres_jax.train.dynamics import DynamicsLog, make_dynamics_step
from attnres_jax.train.steps import init_train_state, make_train_step
from experiments.bench_step import add_variant_arguments, model_config, print_header


def median_seconds(call, repeats: int) -> float:
  times = []
  for _ in range(repeats + 1):  # the first call compiles / warms up
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:])


def measure(config, batch: int, seq_len: int, repeats: int) -> dict:
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-3)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, config.vocab_size)
  train_step, dynamics_step = make_train_step(graphdef, tx, 1), make_dynamics_step(graphdef, 1)
  state = init_train_state(params, tx, 0)

  def one_train_step():
    nonlocal state
    state, metrics = train_step(state, tokens)
    return metrics

  train_s = median_seconds(one_train_step, repeats)
  dynamics_s = median_seconds(lambda: dynamics_step(state.params, tokens), repeats)
  dynamics = jax.device_get(dynamics_step(state.params, tokens))
  with tempfile.TemporaryDirectory() as workdir:
    tensorboard = tensorboardX.SummaryWriter(workdir)
    log = DynamicsLog(workdir, tensorboard, is_main=True)
    write_s = median_seconds(lambda: log.write(0, dynamics), repeats)
    log.close()
    tensorboard.close()
  return dict(train_s=train_s, dynamics_s=dynamics_s, write_s=write_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sublayers", type=int, default=16)
  parser.add_argument("--d_model", type=int, default=256)
  add_variant_arguments(parser, "prenorm,full,block")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--every", type=int, default=100, help="config.train.dynamics_every")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, L {args.sublayers}, d {args.d_model}, "
        f"batch {args.batch}, seq_len {args.seq_len}, dynamics every {args.every} steps")
  print_header("| residual | train step ms | x base | dynamics step ms | / train step | write ms "
               f"| overhead at every={args.every} |")
  baseline = None
  for residual in args.residuals:
    config = model_config(residual, args.sublayers, args.d_model, args.num_blocks, "full")
    result = measure(config, args.batch, args.seq_len, args.repeats)
    baseline = baseline or result
    overhead = (result["dynamics_s"] + result["write_s"]) / (args.every * result["train_s"])
    print(f"| {residual} | {1e3 * result['train_s']:.1f} | {result['train_s'] / baseline['train_s']:.2f} "
          f"| {1e3 * result['dynamics_s']:.1f} | {result['dynamics_s'] / result['train_s']:.2f} "
          f"| {1e3 * result['write_s']:.2f} | {100 * overhead:.2f} % |", flush=True)


if __name__ == "__main__":
  cli.run_argparse(main)
