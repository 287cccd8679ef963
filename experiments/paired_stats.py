"""Differences between two runs of a sweep, paired by seed (the seed fixes initialisation and data order).

`paired(values, reference)` is the mean difference over the seeds both have, its standard error, the seeds
in which the run is below the reference, and the two-sided paired t-test p value (None with fewer than two).
From the command line, any two runs of a sweep's `results.csv` (e.g. each rule at its own best learning rate):

  python -m experiments.paired_stats --csv=sweeps/learning_rate/results.csv --run=block_L32_lr0.006 \
      --baseline=prenorm_L32_lr0.003
"""

import argparse
import csv
import dataclasses

import numpy as np
import scipy.stats

from attnres_jax import cli


@dataclasses.dataclass(frozen=True)
class Paired:
  mean: float
  stderr: float
  below: int  # seeds in which the run is lower than the reference
  seeds: int
  p_value: float | None  # two-sided paired t-test; None with one seed

  def cells(self, digits: int = 4) -> list[str]:
    """Markdown cells: `mean +- s.e.`, `below/seeds`, `p`."""
    p_value = "-" if self.p_value is None else f"{self.p_value:.3f}"
    return [f"{self.mean:+.{digits}f} +- {self.stderr:.{digits}f}", f"{self.below}/{self.seeds}", p_value]


def sample_std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def paired(values: dict[int, float], reference: dict[int, float]) -> Paired | None:
  """`values - reference` over their common seeds; None when they share none."""
  common = sorted(set(values) & set(reference))
  if not common:
    return None
  differences = np.array([values[seed] - reference[seed] for seed in common])
  p_value = None
  if len(common) > 1:
    p_value = float(scipy.stats.ttest_rel([values[s] for s in common], [reference[s] for s in common]).pvalue)
  return Paired(mean=float(differences.mean()), stderr=sample_std(differences) / np.sqrt(len(common)),
                below=int((differences < 0).sum()), seeds=len(common), p_value=p_value)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--csv", required=True, help="a sweep's results.csv")
  parser.add_argument("--run", required=True)
  parser.add_argument("--baseline", required=True)
  parser.add_argument("--metric", default="bits_per_byte", help="a column of the CSV (bits_per_byte, loss)")
  args = parser.parse_args(argv)
  with open(args.csv, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  by_seed = lambda name: {int(r["seed"]): float(r[args.metric]) for r in rows if r["name"] == name}
  values, reference = by_seed(args.run), by_seed(args.baseline)
  for name, found in ((args.run, values), (args.baseline, reference)):
    if not found:
      raise ValueError(f"{args.csv} has no finished run named {name!r}")
  difference = paired(values, reference)
  if difference is None:
    raise ValueError(f"{args.run} and {args.baseline} share no seed")
  mean, below, p_value = difference.cells()
  print(f"{args.run} - {args.baseline} ({args.metric}, {difference.seeds} seeds): {mean}, below in {below}, "
        f"p = {p_value}")


if __name__ == "__main__":
  cli.run_argparse(main)
