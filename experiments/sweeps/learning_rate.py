"""Study 2 of experiments/results/cpu_reproduction.md: is AttnRes's gain an artefact of one learning rate?

PreNorm and Block at `DEPTH` sublayers (the depth study's settings) at peak learning rates 1.5e-3, 3e-3 and
6e-3, 5 seeds; each Block run is compared with PreNorm at the same learning rate. The 3e-3 runs are the depth
study's, linked in: `ln -s ../depth/prenorm_L32 sweeps/learning_rate/prenorm_L32_lr0.003` (likewise block).
Each rule at its own best rate: `python -m experiments.paired_stats --csv=... --run=... --baseline=...`.
"""

import dataclasses

from experiments.sweep import Sweep
from experiments.sweeps.depth import NARROW_BPE, depth_runs

DEPTH = 32
PEAK_LRS = (1.5e-3, 3e-3, 6e-3)
SEEDS = (0, 1, 2, 3, 4)


def get_sweep() -> Sweep:
  prenorm, block, _ = depth_runs(DEPTH)
  runs = []
  for lr in PEAK_LRS:
    at_lr = lambda run, baseline: dataclasses.replace(
        run, name=f"{run.name}_lr{lr:g}", overrides={**run.overrides, "optim.peak_lr": lr},
        baseline=f"{baseline.name}_lr{lr:g}", axis_value=lr)
    runs += [at_lr(prenorm, prenorm), at_lr(block, prenorm)]
  return Sweep(runs=tuple(runs), seeds=SEEDS, common=NARROW_BPE, axis="peak learning rate")
