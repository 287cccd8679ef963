"""The sweep runner trains each run once, resumes by skipping finished runs, prints cluster commands and
collects results; the shipped sweep files load."""

import csv
import glob
import json
import os

import numpy as np
import pytest
import scipy.stats

from experiments import paired_stats
from experiments import sweep as sweep_runner
from experiments.sweep_report import seed_table
from helpers import REPO

SMOKE_SWEEP = '''
from experiments.sweep import Run, Sweep

def get_sweep():
  runs = (Run("prenorm", "configs/smoke.py", {"model.residual": "prenorm"}),)
  return Sweep(runs=runs, seeds=(0, 1), common={"train.num_steps": 3, "train.eval_every": 3,
                                                  "train.checkpoint_every": 3, "train.log_every": 1})
'''


def test_smoke_sweep_runs_resumes_and_collects(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  path, root = tmp_path / "smoke_sweep.py", str(tmp_path / "runs")
  path.write_text(SMOKE_SWEEP)
  sweep_runner.main([f"--sweep={path}", f"--workdir={root}", "--print_commands"])
  commands = capsys.readouterr().out.strip().splitlines()
  assert len(commands) == 2 and all("attnres_jax.main" in c and "--config.train.num_steps=3" in c for c in commands)
  assert "--config.data.seed=1" in commands[1] and "--config.model.residual=prenorm" in commands[0]
  for shard in ("0/2", "1/2"):  # two workers split the runs between them
    sweep_runner.main([f"--sweep={path}", f"--workdir={root}", "--print_commands", f"--shard={shard}"])
  assert capsys.readouterr().out.strip().splitlines() == commands

  sweep_runner.main([f"--sweep={path}", f"--workdir={root}"])
  assert len(glob.glob(os.path.join(root, "*", "seed*", "result.json"))) == 2
  with open(os.path.join(root, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["name"], r["seed"]) for r in rows] == [("prenorm", "0"), ("prenorm", "1")]
  assert all(r["step"] == "3" and 0 < float(r["loss"]) < 10 and float(r["compute"]) > 0 for r in rows)
  assert rows[0]["loss"] != rows[1]["loss"]  # the seed sets init and data order
  table = open(os.path.join(root, "results.md")).read()
  assert "| prenorm | 2 |" in table
  assert os.path.getsize(os.path.join(root, "results.png")) > 10_000
  assert os.path.getsize(os.path.join(root, "curves.png")) > 10_000

  aliased = tmp_path / "aliased_sweep.py"  # a run of another sweep, linked in, counts under this sweep's name
  aliased.write_text(SMOKE_SWEEP.replace('Run("prenorm"', 'Run("alias"'))
  os.symlink(os.path.join(root, "prenorm"), os.path.join(root, "alias"))
  sweep_runner.main([f"--sweep={aliased}", f"--workdir={root}", "--collect"])
  assert "| alias | 2 |" in open(os.path.join(root, "results.md")).read()
  os.remove(os.path.join(root, "alias"))

  os.remove(os.path.join(root, "prenorm", "seed1", "result.json"))  # as if killed before it finished
  capsys.readouterr()
  sweep_runner.main([f"--sweep={path}", f"--workdir={root}"])
  out = capsys.readouterr().out
  assert out.count("finished, skipped") == 1 and "prenorm seed 1: " in out


@pytest.mark.parametrize("name", [
    "table4", "fig6_block_size", "prenorm_full_block", "scaling", "depth", "learning_rate", "window_and_query",
    "training_length"])
def test_shipped_sweeps_load_with_valid_configs(name, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  sweep = sweep_runner.load_sweep(os.path.join(REPO, "experiments", "sweeps", f"{name}.py"))
  assert sweep.runs
  sweep_runner.check_runs(sweep)  # every run's config, overrides applied, passes the run checks
  for run in sweep.runs:
    config = sweep_runner.run_config(sweep, run, sweep.seeds[-1])
    for field, value in {**sweep.common, **run.overrides}.items():
      section, leaf = field.rsplit(".", 1)
      assert config[section][leaf] == value, (run.name, field)


def test_a_misspelt_override_fails_the_sweep_before_training(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = tmp_path / "bad_sweep.py"
  path.write_text(SMOKE_SWEEP.replace('"model.residual"', '"model.residul"'))
  with pytest.raises(SystemExit, match="model.residul"):
    sweep_runner.main([f"--sweep={path}", f"--workdir={tmp_path / 'runs'}"])
  assert not os.path.exists(tmp_path / "runs")


def test_seed_table_pairs_differences_by_seed():
  reference, better = {0: 2.0, 1: 2.1, 2: 2.2}, {2: 2.1, 0: 1.9, 1: 2.05}  # differences -0.1, -0.05, -0.1
  t = -(0.25 / 3) / (np.std([-0.1, -0.05, -0.1], ddof=1) / np.sqrt(3))  # = -5
  p_two_sided = 1 - abs(t) / np.sqrt(2 + t * t)  # Student t with 2 degrees of freedom, in closed form
  base = ("base", reference)
  table = seed_table([(*base, None), ("better", better, base), ("one", {1: 2.2}, base)], "nats").splitlines()
  assert table[0].count("|") == 8 and table[2].startswith("| base | 3 | 2.1000 +- 0.1000 |  |")
  assert table[3] == f"| better | 3 | 2.0167 +- 0.1041 | base | -0.0833 +- 0.0167 | 3/3 | {p_two_sided:.3f} |"
  assert table[4] == "| one | 1 | 2.2000 +- 0.0000 | base | +0.1000 +- 0.0000 | 0/1 | - |"
  plain = seed_table([(*base, None), ("better", better, None)]).splitlines()
  assert plain[0].count("|") == 4 and plain[3] == "| better | 3 | 2.0167 +- 0.1041 |"


def _fake_finished_run(workdir, seed, bits_per_byte_by_step):
  """A run's result.json and metrics.jsonl as a finished run writes them (two bits per byte per nat)."""
  os.makedirs(workdir)
  final_step = max(bits_per_byte_by_step)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, bpb in bits_per_byte_by_step.items():
      f.write(json.dumps({"split": "eval", "step": step, "loss": bpb / 2, "bits_per_byte": bpb}) + "\n")
  with open(os.path.join(workdir, sweep_runner.RESULT), "w") as f:
    json.dump({"seed": seed, "step": final_step, "loss": bits_per_byte_by_step[final_step] / 2,
               "bits_per_byte": bits_per_byte_by_step[final_step], "tokens": 64 * final_step, "compute": 1.0}, f)


def test_runs_are_paired_with_their_own_baselines_along_the_axis(tmp_path, capsys):
  Run, Sweep = sweep_runner.Run, sweep_runner.Sweep
  runs = (Run("base_L8", "c.py", axis_value=8),
          Run("attn_L8", "c.py", variant="attn", baseline="base_L8", axis_value=8),
          Run("base_L16", "c.py", seeds=(0, 1, 2), baseline="base_L16", axis_value=16),  # a second reference
          Run("attn_L16", "c.py", variant="attn", seeds=(0, 1, 2), baseline="base_L16", axis_value=16))
  sweep = Sweep(runs=runs, seeds=(0, 1), axis="sublayers")
  assert [(run.name, seed) for run, seed in sweep_runner.runs_and_seeds(sweep)] == [
      (name, seed) for seed in (0, 1) for name in ("base_L8", "attn_L8", "base_L16", "attn_L16")] + [
      ("base_L16", 2), ("attn_L16", 2)]  # seed by seed
  finals = {"base_L8": [1.0, 1.2], "attn_L8": [1.1, 1.25], "base_L16": [1.0, 1.1, 1.3],
            "attn_L16": [0.9, 1.05, 1.2]}
  for run, seed in sweep_runner.runs_and_seeds(sweep):
    _fake_finished_run(sweep_runner.run_dir(str(tmp_path), run, seed), seed, {5: 3.0, 10: finals[run.name][seed]})
  sweep_runner.collect(sweep, str(tmp_path))

  differences = np.array(finals["attn_L16"]) - np.array(finals["base_L16"])  # -0.1, -0.05, -0.1
  stderr = np.std(differences, ddof=1) / np.sqrt(3)
  p_value = scipy.stats.ttest_rel(finals["attn_L16"], finals["base_L16"]).pvalue
  trend = open(tmp_path / "trend.md").read().splitlines()
  assert trend[2] == "| attn | 8 | base_L8 | 2 | +0.0750 +- 0.0250 | 0/2 | 0.205 |"
  assert trend[3] == f"| attn | 16 | base_L16 | 3 | {differences.mean():+.4f} +- {stderr:.4f} | 3/3 | {p_value:.3f} |"
  table = open(tmp_path / "results.md").read()
  assert "validation bits per byte" in table and "| base_L16 | 3 | 1.1333 +- 0.1528 |  |" in table
  for plot in ("results.png", "curves.png", "gaps.png", "trend.png"):
    assert os.path.getsize(tmp_path / plot) > 10_000, plot
  paired_stats.main([f"--csv={tmp_path / 'results.csv'}", "--run=attn_L16", "--baseline=base_L16"])
  assert capsys.readouterr().out == (f"attn_L16 - base_L16 (bits_per_byte, 3 seeds): {differences.mean():+.4f} +- "
                                     f"{stderr:.4f}, below in 3/3, p = {p_value:.3f}\n")


@pytest.mark.parametrize("shard", ["2/2", "1", "a/2", "-1/2"])
def test_a_bad_shard_is_refused(shard, tmp_path, capsys):
  path = tmp_path / "smoke_sweep.py"
  path.write_text(SMOKE_SWEEP)
  with pytest.raises(SystemExit):
    sweep_runner.main([f"--sweep={path}", f"--workdir={tmp_path / 'runs'}", f"--shard={shard}"])
  assert "expected i/n" in capsys.readouterr().err


def test_scaling_family_keeps_the_papers_ratios_and_the_papers_shapes_build():
  from attnres_jax import Transformer
  from attnres_jax.config_checks import check_run_config
  from configs import scaling
  from flax import nnx
  tokens = []
  for size in scaling.CPU:
    config = scaling.get_config(size)
    check_run_config(config)
    model = config.model
    assert model.num_heads == model.num_layers and model.d_model == 16 * model.num_layers
    assert abs(model.d_ff / model.d_model - 8 / 3) < 0.4
    tokens.append(config.train.num_steps * config.data.global_batch_size * config.data.seq_len)
  assert tokens == sorted(tokens) and tokens[-1] / tokens[0] > 4
  for size, (layers, d_model, peak_lr, *_) in scaling.PAPER.items():
    config = scaling.get_config(size)
    assert (config.model.num_layers, config.model.num_heads, config.model.d_model, config.optim.peak_lr) == (
        layers, layers, d_model, peak_lr)
    abstract = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
    assert abstract.layers.attention.query.shape == (layers, d_model, layers, 128)
  with pytest.raises(ValueError, match="unknown size"):
    scaling.get_config("cpu-9")
