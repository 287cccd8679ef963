"""Scaling-law fits `L = A * C^-alpha` per variant, and each variant's compute multiplier (docs/method.md §9).

Fits are least squares in log space, `log L = log A - alpha log C`, with
standard errors from the fit's covariance. A variant's compute multiplier
against the baseline at a target loss `L*` is `C_baseline(L*) / C_variant(L*)`:
the paper's "Block matches the baseline trained with 1.25x its compute" is a
multiplier of 1.25.

  python -m experiments.fit_scaling --csv=results.csv --baseline=prenorm --out=scaling.png

The CSV needs columns `variant`, `compute` (any unit, e.g. PFLOP/s-days) and `loss`.
"""

import argparse
import csv
import dataclasses

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

from attnres_jax import cli  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """`L = A * C^-alpha`, with standard errors of `log A` and `alpha`."""

  coefficient: float
  exponent: float
  log_coefficient_stderr: float
  exponent_stderr: float

  def loss(self, compute):
    return self.coefficient * np.asarray(compute, np.float64) ** -self.exponent

  def compute_for(self, loss):
    """The compute at which the law reaches `loss`."""
    return (self.coefficient / np.asarray(loss, np.float64)) ** (1.0 / self.exponent)


def fit_power_law(compute, loss) -> PowerLaw:
  """Least squares of `log L` on `log C` (`scipy.stats.linregress`); needs 3 points at distinct compute."""
  log_c, log_l = np.log(np.asarray(compute, np.float64)), np.log(np.asarray(loss, np.float64))
  if len(np.unique(log_c)) < 3:
    raise ValueError(f"need >= 3 distinct compute values to fit a law with errors, got {np.unique(log_c).size}")
  fit = scipy.stats.linregress(log_c, log_l)
  return PowerLaw(float(np.exp(fit.intercept)), float(-fit.slope), float(fit.intercept_stderr), float(fit.stderr))


def compute_multiplier(variant: PowerLaw, baseline: PowerLaw, target_loss: float) -> float:
  """How much more compute the baseline needs than `variant` to reach `target_loss`."""
  if variant.exponent <= 0 or baseline.exponent <= 0:
    raise ValueError(f"a law whose loss does not fall with compute (exponents {variant.exponent:.4f}, "
                     f"{baseline.exponent:.4f}) has no compute multiplier")
  return float(baseline.compute_for(target_loss) / variant.compute_for(target_loss))


def read_points(path: str, metric: str = "loss") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`variant -> (compute, metric)` from a CSV with columns variant, compute and `metric` (loss, or
  bits_per_byte: comparable across tokenizers)."""
  points: dict[str, list[tuple[float, float]]] = {}
  with open(path, newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      if not row.get(metric):
        raise ValueError(f"{path}:{line}: no {metric} value (runs on corpora without byte counts have no "
                         f"bits_per_byte)")
      points.setdefault(row["variant"], []).append((float(row["compute"]), float(row[metric])))
  return {variant: tuple(np.array(column) for column in zip(*rows)) for variant, rows in points.items()}


def plot_fits(points, fits, path: str, compute_unit: str) -> None:
  figure, axis = plt.subplots(figsize=(7, 4.5))
  for variant, (compute, loss) in points.items():
    fit = fits[variant]
    line = axis.plot(compute, loss, "o", label=f"{variant}: {fit.coefficient:.3f} C^-{fit.exponent:.3f}")
    grid = np.geomspace(compute.min(), compute.max(), 50)
    axis.plot(grid, fit.loss(grid), "-", color=line[0].get_color())
  axis.set_xscale("log")
  axis.set_yscale("log")
  axis.set_xlabel(f"training compute ({compute_unit})")
  axis.set_ylabel("validation loss")
  axis.set_title("Scaling fits L = A C^-alpha")
  axis.grid(alpha=0.3, which="both")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--csv", required=True, help="columns: variant, compute, loss")
  parser.add_argument("--baseline", default="prenorm", help="the variant every multiplier is against")
  parser.add_argument("--target_loss", type=float, default=None,
                      help="loss of the multipliers (default: the baseline's loss at its largest compute)")
  parser.add_argument("--metric", default="loss", choices=("loss", "bits_per_byte"),
                      help="the CSV column fitted (bits_per_byte compares runs with different tokenizers)")
  parser.add_argument("--out", default="", help="log-log plot to write (PNG)")
  parser.add_argument("--compute_unit", default="FLOPs")
  args = parser.parse_args(argv)
  points = read_points(args.csv, args.metric)
  if args.baseline not in points:
    raise SystemExit(f"error: no baseline {args.baseline!r} in {args.csv}; variants: {sorted(points)}")
  fits = {variant: fit_power_law(*xy) for variant, xy in points.items()}
  target = args.target_loss or float(fits[args.baseline].loss(points[args.baseline][0].max()))
  print(f"| variant | A | alpha | compute multiplier vs {args.baseline} at L = {target:.4f} |")
  print("|---|---|---|---|")
  for variant, fit in fits.items():
    print(f"| {variant} | {fit.coefficient:.4f} (log-s.e. {fit.log_coefficient_stderr:.4f}) "
          f"| {fit.exponent:.4f} +- {fit.exponent_stderr:.4f} "
          f"| {compute_multiplier(fit, fits[args.baseline], target):.3f} |")
  if args.out:
    plot_fits(points, fits, args.out, args.compute_unit)
    print(args.out)


if __name__ == "__main__":
  cli.run_argparse(main)
