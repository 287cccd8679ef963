"""experiments/device_bench.sh: its dry run (tiny shapes, CPU) prints one table with every row, all measured."""

import os
import re
import subprocess
import sys

import pytest

from attnres_jax.train.flops import train_flops_per_token
from experiments import bench_step
from helpers import REPO


def table_rows(stdout: str) -> list[list[str]]:
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  assert lines[0] == "| part | case | ms | ratio | MFU | notes |" and lines[1].startswith("|---")
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def is_number(text: str) -> bool:
  return re.fullmatch(r"\d+(\.\d+)?", text) is not None


@pytest.mark.slow  # three benchmarks in subprocesses, about a minute: once per CI run
def test_dry_run_prints_every_row_with_numbers():
  done = subprocess.run(["bash", os.path.join(REPO, "experiments", "device_bench.sh"), "--dry_run"],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable),
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = table_rows(done.stdout)
  cases = [(part, re.sub(r" \(S=\d+\)$", "", case)) for part, case, *_ in rows]
  assert cases[:4] == [("step", "PreNorm"), ("step", "Block"), ("step", "Block two-phase"), ("step", "Full")]
  assert cases[-2:] == [("decode", "PreNorm ms/token"), ("decode", "Block ms/token")]
  assert [part for part, _ in cases[4:-2]] == ["kernel", "kernel"]  # fwd and fwd+bwd of the one dry-run shape
  assert all(is_number(ms) and is_number(ratio) for _, _, ms, ratio, _, _ in rows), rows
  assert [row[4] for row in rows[:4]] == ["-"] * 4  # no MFU on a CPU (no known peak)
  assert rows[0][3] == "1.00" and rows[-2][3] == "1.00"  # ratios are to PreNorm


def test_step_mfu_is_model_flops_per_second_over_the_device_peak(monkeypatch):
  config = bench_step.model_config("block", 8, 256, 4, "full", dtype="bfloat16", attention_impl="cudnn")
  assert (config.dtype, config.attention_impl) == ("bfloat16", "cudnn")
  monkeypatch.setattr(bench_step, "peak_flops_per_device", lambda device, dtype: 1e12 if dtype == "bfloat16" else None)
  step_s = 2 * 128 * train_flops_per_token(config, 128) / 1e12 / 0.25  # a step at 25 % of the peak
  assert bench_step.mfu_label(config, 2, 128, step_s) == "25.0%"
  config.dtype = "float32"
  assert bench_step.mfu_label(config, 2, 128, step_s) == "-"
