"""How much of a validation difference the finite validation set could explain, from the runs' last checkpoints.

  python -m experiments.validation_noise --workdir=sweeps/depth/prenorm_L32/seed0 \
      --workdir=sweeps/depth/block_L32/seed0
  python -m experiments.validation_noise --sweep_dir=sweeps/depth --run=block_L32 --baseline=prenorm_L32

Each run is evaluated on the fixed validation batches its training used (`train.eval_batches`, or
`--eval_batches`), batch by batch. With `--workdir`s: per run, the mean (what training logged) and its standard
error over the batches; per later run, its difference to the first, paired batch by batch, with the standard
error of the per-batch differences. With `--sweep_dir`: the per-batch difference of two runs of a sweep averaged
over the seeds both have, and its standard error over batches. That is the validation noise of the sweep's
mean difference: every seed is evaluated on the same text, so it does not shrink with more seeds; compare it
with the seed-to-seed standard error of `results.md`. Batches hold consecutive windows, so the error counts
text that is alike within a region of the split.
"""

import argparse
import os

import jax
import numpy as np

from attnres_jax import cli, data
from attnres_jax.sample import load_model, load_run_config
from attnres_jax.train.loop import bits_per_byte, load_splits_once
from attnres_jax.train.loss import next_token_loss


def batch_losses(workdir: str, eval_batches: int = 0) -> tuple[np.ndarray, dict]:
  """The last checkpoint's mean loss of each validation batch (nats), and the corpus metadata."""
  config = load_run_config(workdir)
  model, _ = load_model(workdir, config)
  splits = load_splits_once(config)
  batches = data.eval_batches(splits.val, seq_len=config.data.seq_len, global_batch_size=config.data.global_batch_size,
                              num_batches=eval_batches or config.train.eval_batches)
  loss = jax.jit(next_token_loss)
  return np.array([float(loss(model, batch)) for batch in batches]), splits.metadata


def _reporting_unit(metadata: dict) -> tuple[float, str]:
  """(factor from nats, unit): bits per byte where the corpus records its bytes, else nats."""
  to_bpb = bits_per_byte(1.0, metadata)
  return (to_bpb, "bits per byte") if to_bpb is not None else (1.0, "nats")


def noise_table(workdirs: list[str], eval_batches: int = 0) -> str:
  """Markdown: per run its validation metric +- s.e. over batches, and its batch-paired difference to the first."""
  losses, metadata = zip(*(batch_losses(workdir, eval_batches) for workdir in workdirs))
  scale, unit = _reporting_unit(metadata[0])
  stderr = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x)))
  lines = [f"| run | batches | validation {unit} (+- s.e. over batches) | - first, paired by batch (+- s.e.) |",
           "|---|---|---|---|"]
  for workdir, run_losses in zip(workdirs, losses):
    if len(run_losses) != len(losses[0]):
      raise ValueError(f"{workdir}: {len(run_losses)} validation batches, the first run has {len(losses[0])}")
    difference = scale * (run_losses - losses[0])
    paired = "" if workdir == workdirs[0] else f"{difference.mean():+.4f} +- {stderr(difference):.4f}"
    lines.append(f"| {workdir} | {len(run_losses)} | {scale * run_losses.mean():.4f} +- "
                 f"{stderr(scale * run_losses):.4f} | {paired} |")
  return "\n".join(lines) + "\n"


def seed_averaged_difference(sweep_dir: str, run: str, baseline: str, eval_batches: int = 0) -> str:
  """One line: `run - baseline` per validation batch, averaged over their common seeds, +- s.e. over batches."""
  seeds = sorted(set(os.listdir(os.path.join(sweep_dir, run))) & set(os.listdir(os.path.join(sweep_dir, baseline))))
  seeds = [seed for seed in seeds if seed.startswith("seed")]
  if not seeds:
    raise ValueError(f"{sweep_dir}: runs {run} and {baseline} share no seed directory")
  differences, metadata = [], None
  for seed in seeds:
    run_losses, metadata = batch_losses(os.path.join(sweep_dir, run, seed), eval_batches)
    differences.append(run_losses - batch_losses(os.path.join(sweep_dir, baseline, seed), eval_batches)[0])
  scale, unit = _reporting_unit(metadata)
  per_batch = scale * np.mean(differences, axis=0)
  return (f"{run} - {baseline} ({unit}, {len(seeds)} seeds, {len(per_batch)} batches): {per_batch.mean():+.4f}, "
          f"validation s.e. {np.std(per_batch, ddof=1) / np.sqrt(len(per_batch)):.4f}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", action="append", default=[],
                      help="a training workdir (repeat it; the first is the reference)")
  parser.add_argument("--sweep_dir", default="", help="a sweep's workdir: compare --run with --baseline over seeds")
  parser.add_argument("--run", default="")
  parser.add_argument("--baseline", default="")
  parser.add_argument("--eval_batches", type=int, default=0, help="validation batches; 0 = each run's own")
  args = parser.parse_args(argv)
  if bool(args.workdir) == bool(args.sweep_dir) or bool(args.sweep_dir) != bool(args.run and args.baseline):
    parser.error("give --workdir (repeated), or --sweep_dir with --run and --baseline")
  if args.sweep_dir:
    print(seed_averaged_difference(args.sweep_dir, args.run, args.baseline, args.eval_batches))
  else:
    print(noise_table(args.workdir, args.eval_batches))


if __name__ == "__main__":
  cli.run_argparse(main)
