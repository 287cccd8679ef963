"""Runs a sweep (named config overrides x seeds) one run after another, and collects its results.

A sweep is a Python file defining `get_sweep() -> Sweep` (see `experiments/sweeps/`).
Each run trains with `attnres_jax.main` into `<workdir>/<name>/seed<k>`, seed by
seed (every run gets its first seed before any gets a second); a run that
finished has a `result.json` and is skipped, and a killed run resumes from its
checkpoint, so rerunning a killed sweep picks up where it stopped.

  python -m experiments.sweep --sweep=experiments/sweeps/table4.py --workdir=sweeps/table4
  python -m experiments.sweep --sweep=... --workdir=... --print_commands   # one line per run, for a cluster
  python -m experiments.sweep --sweep=... --workdir=... --collect          # results only
  python -m experiments.sweep --sweep=... --workdir=... --shard=1/2   # every 2nd run from the 2nd: one of 2 workers

Collecting writes `results.csv` (one row per run; the columns
`experiments/fit_scaling.py` reads: variant, compute = training FLOPs, loss) and
the tables and plots of `experiments/sweep_report.py` into the workdir: the
final validation metric over seeds, each run's difference to its baseline
paired by seed, gap curves, and the trend along the sweep's `axis`.
"""

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from typing import Any

import ml_collections

from attnres_jax import cli
from attnres_jax.config_checks import check_run_config
from attnres_jax.train.flops import train_flops_per_token
from attnres_jax.train.metrics import read_metrics
from experiments.sweep_report import Report

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Run:
  """One named configuration: a config file (`path` or `path:arg`), dotted overrides of its fields, the variant
  it belongs to in a scaling fit or a trend (default: its name), its own seeds (default: the sweep's), the run it
  is compared with, paired by seed (default: the sweep's first; itself: none), and its position on the sweep's
  `axis`."""

  name: str
  config: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  variant: str = ""
  seeds: tuple[int, ...] = ()
  baseline: str = ""
  axis_value: float | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
  runs: tuple[Run, ...]
  seeds: tuple[int, ...] = (0,)
  common: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of every run (applied first)
  compare: bool = True  # results.md compares every run with its baseline, paired by seed
  axis: str = ""  # what the runs' `axis_value` is (e.g. "sublayers"): trend.md / trend.png against it


def load_sweep(path: str) -> Sweep:
  module = _import_file(path, "sweep_definition")
  if not callable(getattr(module, "get_sweep", None)):
    raise ValueError(f"{path} defines no get_sweep() returning a Sweep (see experiments/sweeps/)")
  sweep = module.get_sweep()
  names = [run.name for run in sweep.runs]
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: run names must be unique, got {names}")
  for run in sweep.runs:
    if run.baseline and run.baseline not in names:
      raise ValueError(f"{path}: run {run.name}: baseline {run.baseline!r} is not a run of the sweep")
  return sweep


def baseline_of(sweep: Sweep, run: Run) -> Run:
  """The run `run` is compared with: its `baseline`, else the sweep's first run."""
  return next(other for other in sweep.runs if other.name == (run.baseline or sweep.runs[0].name))


def _import_file(path: str, name: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file {path}")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _overrides(sweep: Sweep, run: Run, seed: int) -> dict[str, Any]:
  """The sweep's common overrides, then the run's, then the seed (it sets both init and data order)."""
  return {**sweep.common, **run.overrides, "train.seed": seed, "data.seed": seed}


def run_config(sweep: Sweep, run: Run, seed: int) -> ml_collections.ConfigDict:
  """The run's config as `attnres_jax.main` will build it (config file, its argument, then the overrides)."""
  path, _, argument = run.config.partition(":")
  module = _import_file(path, "sweep_run_config")
  config = module.get_config(argument) if argument else module.get_config()
  for field, value in _overrides(sweep, run, seed).items():
    *parents, leaf = field.split(".")
    section = config
    for parent in parents:
      section = section[parent]
    if leaf not in section:
      raise ValueError(f"run {run.name}: override {field}={value!r} names no config field")
    section[leaf] = value
  return config


def check_runs(sweep: Sweep) -> None:
  """Every run's config is valid before anything trains (a typo fails the sweep at once, not hours in)."""
  for run, seed in runs_and_seeds(sweep):
    try:
      check_run_config(run_config(sweep, run, seed))
    except (ValueError, FileNotFoundError, TypeError) as error:
      raise SystemExit(f"error: run {run.name} seed {seed}: {error}") from error


def run_dir(root: str, run: Run, seed: int) -> str:
  return os.path.join(root, run.name, f"seed{seed}")


def command(sweep: Sweep, run: Run, seed: int, root: str) -> list[str]:
  """The `attnres_jax.main` command line of one run."""
  return [sys.executable, "-m", "attnres_jax.main", f"--config={run.config}", f"--workdir={run_dir(root, run, seed)}",
          *(f"--config.{field}={value}" for field, value in _overrides(sweep, run, seed).items())]


def parse_shard(text: str) -> tuple[int, int]:
  """`i/n` (0 <= i < n): this worker trains the runs whose position in the sweep is i mod n."""
  index, _, count = text.partition("/")
  if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
    raise argparse.ArgumentTypeError(f"--shard={text}: expected i/n with 0 <= i < n, e.g. 0/2")
  return int(index), int(count)


def runs_and_seeds(sweep: Sweep, shard: tuple[int, int] = (0, 1)) -> list[tuple[Run, int]]:
  """The sweep's (run, seed) pairs, seed by seed (every run has its first seed before any has its second), every
  n-th one from the i-th for shard (i, n)."""
  seeds_of = lambda run: run.seeds or sweep.seeds
  pairs = [(run, seed) for seed in sorted({s for run in sweep.runs for s in seeds_of(run)}) for run in sweep.runs
           if seed in seeds_of(run)]
  return pairs[shard[0]::shard[1]]


def run_result(run: Run, seed: int, workdir: str) -> dict[str, Any]:
  """A finished run's final validation loss (`loss`, and `bits_per_byte` where the corpus records its bytes,
  else ""), train loss, tokens and training FLOPs (`compute`)."""
  records = read_metrics(workdir)
  last = lambda split: [r for r in records if r["split"] == split][-1]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokens = last("eval")["step"] * config.data.global_batch_size * config.data.seq_len
  return {"name": run.name, "variant": run.variant or run.name, "seed": seed, "step": last("eval")["step"],
          "loss": last("eval")["loss"], "bits_per_byte": last("eval").get("bits_per_byte", ""),
          "train_loss": last("train")["loss"], "tokens": tokens,
          "compute": tokens * train_flops_per_token(config.model, config.data.seq_len)}


def execute(sweep: Sweep, root: str, shard: tuple[int, int] = (0, 1)) -> None:
  """Trains every unfinished run of the shard in order; a failing run stops the sweep with its exit code."""
  check_runs(sweep)
  for run, seed in runs_and_seeds(sweep, shard):
    workdir = run_dir(root, run, seed)
    if os.path.exists(os.path.join(workdir, RESULT)):
      print(f"[sweep] {run.name} seed {seed}: finished, skipped", flush=True)
      continue
    print(f"[sweep] {run.name} seed {seed}: {shlex.join(command(sweep, run, seed, root))}", flush=True)
    code = subprocess.call(command(sweep, run, seed, root))
    if code:
      raise SystemExit(f"error: run {run.name} seed {seed} failed with exit code {code}; rerun to resume")
    result = run_result(run, seed, workdir)
    with open(os.path.join(workdir, RESULT + ".tmp"), "w", encoding="utf-8") as f:
      json.dump(result, f)
    os.replace(os.path.join(workdir, RESULT + ".tmp"), os.path.join(workdir, RESULT))


def collect(sweep: Sweep, root: str) -> list[dict]:
  """Writes results.csv and the tables and plots of `experiments/sweep_report.py` from the finished runs;
  returns the CSV rows."""
  finished = [(run, seed) for run, seed in runs_and_seeds(sweep)
              if os.path.exists(os.path.join(run_dir(root, run, seed), RESULT))]
  if not finished:
    raise SystemExit(f"error: no finished runs under {root}")
  rows = []
  for run, seed in finished:  # named by this sweep's run: a result may be linked in from another sweep
    with open(os.path.join(run_dir(root, run, seed), RESULT), encoding="utf-8") as f:
      rows.append({**json.load(f), "name": run.name, "variant": run.variant or run.name})
  with open(os.path.join(root, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  workdirs = {(run.name, seed): run_dir(root, run, seed) for run, seed in finished}
  Report(sweep, root, rows, workdirs, {run.name: baseline_of(sweep, run).name for run in sweep.runs}).write()
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", required=True, help="a sweep file with get_sweep()")
  parser.add_argument("--workdir", required=True, help="root of the runs' workdirs and the results")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--print_commands", action="store_true", help="print one command line per run, run nothing")
  mode.add_argument("--collect", action="store_true", help="only collect the finished runs' results")
  parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                      help="i/n: train (or print) only every n-th run from the i-th, for n parallel workers")
  args = parser.parse_args(argv)
  sweep = load_sweep(args.sweep)
  if args.print_commands:
    for run, seed in runs_and_seeds(sweep, args.shard):
      print(shlex.join(command(sweep, run, seed, args.workdir)))
    return
  if not args.collect:
    execute(sweep, args.workdir, args.shard)
  collect(sweep, args.workdir)
  print(open(os.path.join(args.workdir, "results.md"), encoding="utf-8").read())


if __name__ == "__main__":
  cli.run_argparse(main)
