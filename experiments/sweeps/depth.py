"""Study 1 of experiments/results/cpu_reproduction.md: PreNorm, Full and Block AttnRes against depth.

8, 16, 32 and 64 sublayers at a fixed narrow width (d_model 64), on the stdlib corpus as BPE tokens
(vocabulary 4096; 5% of the files held out, so that the validation set's own noise stays below the seeds'),
800 steps of 16 x 128 tokens (1.6M tokens), the same hyperparameters for every rule.
Block keeps N = 8 blocks (S = L / 8), except at 8 sublayers where N = 8 would be Full: there S = 2 (N = 4).
"""

from experiments.sweep import Run, Sweep

SUBLAYERS = (8, 16, 32, 64)

NARROW_BPE = {
    "model.d_model": 64, "model.num_heads": 2, "model.num_kv_heads": 2, "model.d_ff": 192,
    "model.vocab_size": 0, "data.tokenizer": "bpe", "data.bpe_vocab_size": 4096, "data.val_fraction": 0.05,
    "train.num_steps": 800, "train.eval_every": 200, "train.eval_batches": 48, "train.checkpoint_every": 100,
    "train.dynamics_every": 100,
}


def block_size(sublayers: int) -> int:
  return max(2, sublayers // 8)


def depth_runs(sublayers: int, seeds: tuple[int, ...] = ()) -> tuple[Run, ...]:
  """PreNorm (the reference), Block and Full at one depth, each compared with that depth's PreNorm."""
  layers, prenorm = {"model.num_layers": sublayers // 2}, f"prenorm_L{sublayers}"
  common = dict(seeds=seeds, baseline=prenorm, axis_value=sublayers)
  return (Run(prenorm, "configs/prenorm.py", layers, "prenorm", **common),
          Run(f"block_L{sublayers}", "configs/block.py", {**layers, "model.block_size": block_size(sublayers)},
              "block", **common),
          Run(f"full_L{sublayers}", "configs/full.py", layers, "full", **common))


def get_sweep() -> Sweep:
  return Sweep(runs=tuple(run for sublayers in SUBLAYERS for run in depth_runs(sublayers)), seeds=(0, 1, 2),
               common=NARROW_BPE, axis="sublayers")
