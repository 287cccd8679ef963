"""Scaling study analogue (docs/method.md §9): PreNorm, Full and Block at the five CPU sizes of
`configs/scaling.py`; `experiments/fit_scaling.py --csv=<workdir>/results.csv` fits each rule's law."""

from configs.scaling import CPU
from experiments.sweep import Run, Sweep


def get_sweep() -> Sweep:
  runs = tuple(Run(f"{residual}_{size}", f"configs/scaling.py:{size}", {"model.residual": residual}, residual)
               for size in CPU for residual in ("prenorm", "full", "block"))
  return Sweep(runs=runs, compare=False)  # the fit compares the rules, size by size
