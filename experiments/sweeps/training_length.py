"""Study 3 of experiments/results/cpu_reproduction.md: does AttnRes's lead over PreNorm persist, shrink or grow
with training? PreNorm, Block and Full at `DEPTH` sublayers in the depth study's settings, trained 2x and 4x as
long (each with its own full cosine schedule), 3 seeds, each compared with PreNorm of the same length; Full at
2x only (its CPU cost). The 1x runs are the depth study's, linked in:
`ln -s ../depth/prenorm_L32 sweeps/training_length/prenorm_L32_steps800` (likewise block, full).
"""

import dataclasses

from configs import base
from experiments.sweep import Sweep
from experiments.sweeps.depth import NARROW_BPE, depth_runs

DEPTH = 32
STEPS = (800, 1600, 3200)
TOKENS_PER_STEP = base.get_config().data.global_batch_size * base.get_config().data.seq_len


def get_sweep() -> Sweep:
  runs = []
  for steps in STEPS:
    for run in depth_runs(DEPTH):
      if run.variant == "full" and steps > 1600:
        continue
      runs.append(dataclasses.replace(
          run, name=f"{run.name}_steps{steps}", overrides={**run.overrides, "train.num_steps": steps},
          baseline=f"prenorm_L{DEPTH}_steps{steps}", axis_value=steps * TOKENS_PER_STEP))
  return Sweep(runs=tuple(runs), seeds=(0, 1, 2), common=NARROW_BPE, axis="training tokens")
