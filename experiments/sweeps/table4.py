"""Table 4 analogue (docs/method.md §8): every config under `configs/ablations/` at CPU scale."""

import os

from experiments.sweep import Run, Sweep
from experiments.sweeps.cpu_scale import CPU_ABLATION

ABLATIONS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ablations")


def get_sweep() -> Sweep:
  names = sorted(f[:-3] for f in os.listdir(ABLATIONS)
                 if f.endswith(".py") and f not in ("__init__.py", "common.py", "block_size.py"))
  return Sweep(runs=tuple(Run(name, f"configs/ablations/{name}.py") for name in names), common=CPU_ABLATION)
