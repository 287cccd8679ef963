"""Differences between two runs of a sweep, paired by seed (the seed fixes initialisation and data order).

`paired(values, reference)` is the mean difference over the seeds both have, its standard error, the seeds
in which the run is below the reference, and the two-sided paired t-test p value (None with fewer than two).
"""

import dataclasses

import numpy as np
import scipy.stats


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
