"""Peak host memory of a restart against the training run it resumes (CPU: device memory is host memory).

  python -m experiments.bench_restart --d_model=1024 --num_layers=6

Three runs of `attnres_jax.main` in fresh processes on one workdir, each
reporting its own peak resident memory (`ru_maxrss`):

1. train: a new run of `--steps` steps, checkpointing half-way and at the end;
2. restart + train: the last checkpoint removed, it resumes half-way and trains to the end;
3. restart only: resumes at the last step (nothing left to train): restoring alone.

A restart that built a fresh state beside the restored one would need the
state's size more than training does (`state MiB`: parameters and both AdamW
moments). `--repo` runs another checkout's code (its `attnres_jax` package),
to compare versions.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from attnres_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the trainer and prints its peak resident memory (ru_maxrss is in KiB on Linux) as it exits.
PEAK_WRAPPER = ("import atexit, resource, runpy, sys; "
                "atexit.register(lambda: print(f'peak_rss_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', "
                "file=sys.stderr)); sys.argv[0] = 'attnres_jax.main'; "
                "runpy.run_module('attnres_jax.main', run_name='__main__')")


def run_peak_mib(repo: str, workdir: str, overrides: list[str]) -> float:
  """Runs `attnres_jax.main` from `repo` on `workdir`; its peak resident memory in MiB."""
  command = [sys.executable, "-c", PEAK_WRAPPER, "--config=configs/base.py", f"--workdir={workdir}", *overrides]
  result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  peak = [line for line in result.stderr.splitlines() if line.startswith("peak_rss_kib ")][-1]
  return int(peak.split()[1]) / 1024


def state_mib(d_model: int, num_layers: int, d_ff: int, vocab_size: int) -> float:
  """Parameters + AdamW's two moments in float32 (the matrices; norms and queries are negligible)."""
  layer = 4 * d_model * d_model + 3 * d_model * d_ff
  params = num_layers * layer + 2 * vocab_size * d_model
  return 3 * 4 * params / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--steps", type=int, default=4, help="training steps (even: a checkpoint half-way)")
  parser.add_argument("--repo", default=REPO, help="checkout whose attnres_jax runs")
  args = parser.parse_args()
  if args.steps < 2 or args.steps % 2:
    raise ValueError(f"--steps={args.steps}: must be an even number >= 2")
  d_ff = 4 * args.d_model
  overrides = [f"--config.model.d_model={args.d_model}", f"--config.model.num_layers={args.num_layers}",
               f"--config.model.d_ff={d_ff}", "--config.model.num_heads=8", "--config.model.num_kv_heads=8",
               "--config.data.seq_len=64", "--config.data.global_batch_size=4", "--config.optim.warmup_steps=1",
               f"--config.train.num_steps={args.steps}", f"--config.train.checkpoint_every={args.steps // 2}",
               f"--config.train.eval_every={args.steps}", "--config.train.eval_batches=1",
               "--config.train.dynamics_every=0"]
  workdir = tempfile.mkdtemp(prefix="bench_restart-")
  try:
    train = run_peak_mib(args.repo, workdir, overrides)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(args.steps)))
    restart_and_train = run_peak_mib(args.repo, workdir, overrides)
    restart_only = run_peak_mib(args.repo, workdir, overrides)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  state = state_mib(args.d_model, args.num_layers, d_ff, vocab_size=256)
  print(f"d_model {args.d_model}, {args.num_layers} layers, state {state:.0f} MiB (float32 parameters + AdamW "
        f"moments)\n")
  print("| run | peak RSS MiB | x train |\n|---|---|---|")
  for name, peak in (("train", train), ("restart + train", restart_and_train), ("restart only", restart_only)):
    print(f"| {name} | {peak:.0f} | {peak / train:.2f} |")


if __name__ == "__main__":
  cli.run_argparse(main)
