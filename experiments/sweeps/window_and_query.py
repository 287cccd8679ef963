"""Study 5 of experiments/results/cpu_reproduction.md: the two Table 4 rows far from the paper, at 32 sublayers
in the depth study's settings, 3 seeds, each compared with Full AttnRes: the sliding window (the embedding and
the 8 newest sources), and the input-dependent query in the paper's form (`q = w + W h`) and ours
(`q = w + W RMSNorm(h)`, docs/method.md §12.4). Full and PreNorm are the depth study's runs, linked in:
`ln -s ../depth/full_L32 sweeps/window_and_query/full_L32` (likewise prenorm_L32).
"""

import dataclasses

from experiments.sweep import Sweep
from experiments.sweeps.depth import NARROW_BPE, depth_runs

DEPTH = 32
VARIANTS = {"window8": {"model.depth_window": 8}, "query": {"model.depth_query_projection": True},
            "query_normalized": {"model.depth_query_projection": True, "model.depth_query_norm": True}}


def get_sweep() -> Sweep:
  prenorm, _, full = depth_runs(DEPTH)
  full = dataclasses.replace(full, baseline=full.name)  # the reference of this sweep
  variants = tuple(dataclasses.replace(full, name=f"full_{name}_L{DEPTH}", overrides={**full.overrides, **changes},
                                       variant=f"full_{name}", baseline=full.name)
                   for name, changes in VARIANTS.items())
  return Sweep(runs=(full, *variants, prenorm), seeds=(0, 1, 2), common=NARROW_BPE)
