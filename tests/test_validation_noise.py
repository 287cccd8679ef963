"""`experiments/validation_noise.py` re-evaluates a run's last checkpoint on the batches its training used."""

import json
import os

import numpy as np

from experiments import validation_noise
from helpers import run_main


def test_batch_losses_average_to_the_logged_validation_loss(tmp_path):
  runs = [str(tmp_path / name) for name in ("a", "b")]
  for seed, workdir in enumerate(runs):
    code, output = run_main(workdir, "--config.train.num_steps=4", "--config.train.eval_batches=3",
                            f"--config.train.seed={seed}")
    assert code == 0, output
  losses, metadata = validation_noise.batch_losses(runs[0])
  with open(os.path.join(runs[0], "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if r["split"] == "eval"][-1]
  assert losses.shape == (3,) and np.std(losses) > 0
  np.testing.assert_allclose(losses.mean(), logged["loss"], rtol=1e-5)
  table = validation_noise.noise_table(runs).splitlines()
  assert f"| {logged['bits_per_byte']:.4f} +- " in table[2] and table[2].endswith("|  |")
  second = validation_noise.batch_losses(runs[1])[0] - losses
  bpb_per_nat = logged["bits_per_byte"] / logged["loss"]
  assert table[3].endswith(f"| {bpb_per_nat * second.mean():+.4f} +- "
                           f"{bpb_per_nat * np.std(second, ddof=1) / np.sqrt(3):.4f} |")
