"""Tables and plots of a sweep's finished runs (`experiments/sweep.py --collect` writes them into its workdir).

- `results.md`: each run's final validation metric (mean +- std over seeds) and its difference to its baseline
  run, paired by seed: mean +- standard error, seeds below, paired t-test p (`experiments/paired_stats.py`).
- `trend.md`, `trend.png` (sweeps with an `axis`): those differences against the axis, one line per variant.
- `results.png`: the final metric per run; `curves.png`: validation metric against tokens seen, mean +- std band
  over seeds; `gaps.png`: each run's paired gap to its baseline against tokens seen, mean +- s.e. band.

The metric is bits per byte where every run records it (a corpus with known bytes), else the loss in nats.
"""

import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from attnres_jax.train.metrics import read_metrics  # noqa: E402
from experiments.paired_stats import paired, sample_std  # noqa: E402

UNITS = {"bits_per_byte": "bits per byte", "loss": "nats"}


def metric_of(rows: list[dict]) -> str:
  """`bits_per_byte` if every result has it, else `loss`."""
  return "bits_per_byte" if all(row.get("bits_per_byte", "") != "" for row in rows) else "loss"


def seed_table(rows: list[tuple[str, dict[int, float], tuple[str, dict[int, float]] | None]],
               unit: str = "nats") -> str:
  """Markdown: per run (name, values by seed, (baseline name, its values) or None) the mean +- std over seeds
  and, where it has a baseline, the difference paired by seed."""
  compare = any(baseline for _, _, baseline in rows)
  header = ["run", "seeds", f"validation {unit} (mean +- std)"]
  if compare:
    header += ["vs", "difference, paired (mean +- s.e.)", "seeds below", "p (paired t)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, values, baseline in rows:
    cells = [name, str(len(values)), f"{np.mean(list(values.values())):.4f} +- {sample_std(list(values.values())):.4f}"]
    if compare:
      difference = paired(values, baseline[1]) if baseline else None
      cells += [baseline[0] if baseline else "", *(difference.cells() if difference else ["", "", ""])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _eval_curve(workdir: str, metric: str) -> dict[int, float]:
  """Validation metric by step."""
  records = read_metrics(workdir)
  return {r["step"]: r[metric] for r in records if r["split"] == "eval"}


class Report:
  """The finished results of a sweep: `values[run][seed]` (final metric), validation curves, tokens per step."""

  def __init__(self, sweep, root: str, rows: list[dict], workdirs: dict[tuple[str, int], str],
               baselines: dict[str, str]):
    """`rows`: the runs' results; `workdirs[(name, seed)]`; `baselines[name]`: the run it is compared with."""
    self.sweep, self.root, self.metric = sweep, root, metric_of(rows)
    self.unit = UNITS[self.metric]
    self.values = collections.defaultdict(dict)
    self.tokens_per_step = {}
    for row in rows:
      self.values[row["name"]][row["seed"]] = row[self.metric]
      self.tokens_per_step[row["name"]] = row["tokens"] / row["step"]
    self.runs = [run for run in sweep.runs if run.name in self.values]
    self.curves = {run.name: {seed: _eval_curve(workdirs[(run.name, seed)], self.metric)
                              for seed in self.values[run.name]} for run in self.runs}
    self._baselines = baselines

  def baseline(self, run):
    """The name of the run `run` is compared with, or None (itself, not finished, or a sweep without comparisons)."""
    name = self._baselines[run.name]
    return name if self.sweep.compare and name != run.name and name in self.values else None

  def write(self) -> None:
    rows = [(run.name, self.values[run.name],
             (self.baseline(run), self.values[self.baseline(run)]) if self.baseline(run) else None)
            for run in self.runs]
    with open(os.path.join(self.root, "results.md"), "w", encoding="utf-8") as f:
      f.write(seed_table(rows, self.unit))
    self._plot_final()
    self._plot_curves()
    if any(self.baseline(run) for run in self.runs):
      self._plot_gaps()
    if self.sweep.axis:
      self._write_trend()

  def _plot_final(self) -> None:
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(self.runs) + 2), 4.5))
    values = [list(self.values[run.name].values()) for run in self.runs]
    axis.errorbar(np.arange(len(values)), [np.mean(v) for v in values], yerr=[sample_std(v) for v in values],
                  fmt="o", capsize=4)
    axis.set_xticks(np.arange(len(values)), [run.name for run in self.runs], rotation=45, ha="right")
    axis.set_ylabel(f"final validation {self.unit}")
    self._finish(figure, axis, "results.png", legend=False)

  def _common_steps(self, *names: str) -> list[int]:
    curves = [curve for name in names for curve in self.curves[name].values()]
    return sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []

  def _plot_curves(self) -> None:
    """Validation metric against tokens seen: the mean over a run's seeds, with a +- std band."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in self.runs:
      steps = self._common_steps(run.name)
      curves = np.array([[curve[step] for step in steps] for curve in self.curves[run.name].values()])
      if not steps:
        continue
      spread = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
      tokens = np.array(steps) * self.tokens_per_step[run.name]
      line, = axis.plot(tokens, curves.mean(axis=0), "o-", markersize=3, label=f"{run.name} ({len(curves)} seeds)")
      axis.fill_between(tokens, curves.mean(axis=0) - spread, curves.mean(axis=0) + spread, color=line.get_color(),
                        alpha=0.2)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel(f"validation {self.unit}")
    self._finish(figure, axis, "curves.png")

  def _plot_gaps(self) -> None:
    """Each run's difference to its baseline against tokens seen, paired by seed: mean +- s.e. band."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in self.runs:
      baseline = self.baseline(run)
      if not baseline:
        continue
      steps = self._common_steps(run.name, baseline)
      gaps = [paired({seed: curve[step] for seed, curve in self.curves[run.name].items()},
                     {seed: curve[step] for seed, curve in self.curves[baseline].items()}) for step in steps]
      if not steps or gaps[0] is None:
        continue
      tokens = np.array(steps) * self.tokens_per_step[run.name]
      mean, stderr = np.array([g.mean for g in gaps]), np.array([g.stderr for g in gaps])
      line, = axis.plot(tokens, mean, "o-", markersize=3, label=f"{run.name} - {baseline} ({gaps[0].seeds} seeds)")
      axis.fill_between(tokens, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.2)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel(f"validation {self.unit}, difference to baseline")
    self._finish(figure, axis, "gaps.png")

  def _write_trend(self) -> None:
    """Paired differences to the baseline against `sweep.axis`, one line per variant (trend.md, trend.png)."""
    lines = [f"| variant | {self.sweep.axis} | vs | seeds | difference, paired (mean +- s.e.) | seeds below | p |",
             "|---|---|---|---|---|---|---|"]
    by_variant = collections.defaultdict(list)
    for run in self.runs:
      baseline = self.baseline(run)
      if baseline and run.axis_value is not None:
        difference = paired(self.values[run.name], self.values[baseline])
        by_variant[run.variant or run.name].append((run.axis_value, difference))
        mean, below, p_value = difference.cells()
        lines.append(f"| {run.variant or run.name} | {run.axis_value:g} | {baseline} | {difference.seeds} | {mean} | "
                     f"{below} | {p_value} |")
    with open(os.path.join(self.root, "trend.md"), "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for variant, points in by_variant.items():
      points.sort(key=lambda point: point[0])
      axis.errorbar([x for x, _ in points], [d.mean for _, d in points], yerr=[d.stderr for _, d in points],
                    fmt="o-", capsize=4, label=variant)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel(self.sweep.axis)
    axis.set_ylabel(f"final validation {self.unit}, paired difference (+- s.e.)")
    self._finish(figure, axis, "trend.png")

  def _finish(self, figure, axis, filename: str, legend: bool = True) -> None:
    axis.set_title(os.path.basename(os.path.abspath(self.root)))
    axis.grid(alpha=0.3)
    if legend:
      axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(os.path.join(self.root, filename), dpi=110)
    plt.close(figure)
