"""Figure 6 analogue (docs/method.md §8): Block AttnRes at 32 sublayers, S = 1 .. 32, and the baseline."""

from experiments.sweep import Run, Sweep
from experiments.sweeps.cpu_scale import CPU_ABLATION


def get_sweep() -> Sweep:
  runs = [Run("baseline", "configs/ablations/baseline.py")]
  runs += [Run(f"block_S{size}", f"configs/ablations/block_size.py:{size}") for size in (1, 2, 4, 8, 16, 32)]
  return Sweep(runs=tuple(runs), common=CPU_ABLATION)
