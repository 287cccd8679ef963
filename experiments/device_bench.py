"""One table of the accelerator numbers: train step time and MFU, the depth-attention kernel, decode latency.

Runs three benchmarks, each in its own process (which then has the GPU to
itself) with a share of the time budget; one cut short keeps the rows it had
printed. On one GPU, at a paper-436M-like shape (32 sublayers, d = 1280,
4 x 8192 tokens, bf16, cuDNN attention, full remat, Block N = 8):

- `bench_step`: fwd+bwd step time of PreNorm, Block, Block two-phase and
  Full, ratios to PreNorm, and MFU;
- `bench_kernel`: the Pallas depth-attention kernel against its XLA
  reference at its accelerator shapes (ratio: XLA time / kernel time);
- `bench_decode`: per-token decode latency of Block against PreNorm.

  bash experiments/device_bench.sh                  # from the repository root, on a GPU machine
  python -m experiments.device_bench --dry_run      # tiny shapes on CPU, seconds (what the tests run)

It exits with 1 when a part failed or ran out of time (its rows say which).
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time

from attnres_jax import cli

STEP_VARIANTS = {"prenorm": "PreNorm", "block": "Block", "block_two_phase": "Block two-phase", "full": "Full"}
DECODE_VARIANTS = {"prenorm": "PreNorm", "block": "Block"}
STEP_RESIDUALS = f"--residuals={','.join(STEP_VARIANTS)}"
DECODE_RESIDUALS = f"--residuals={','.join(DECODE_VARIANTS)}"


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  module: str
  gpu_args: tuple[str, ...]
  dry_run_args: tuple[str, ...]
  budget_share: float  # of the time budget; what a part leaves goes to the ones after it


PARTS = (
    Part("step", "experiments.bench_step",
         ("--sublayers=32", "--d_models=1280", "--batch=4", "--seq_len=8192", "--steps=5", "--remat=full",
          "--dtype=bfloat16", "--attention_impl=cudnn", "--num_blocks=8", STEP_RESIDUALS),
         ("--sublayers=2", "--d_models=64", "--batch=1", "--seq_len=32", "--steps=2", "--remat=none",
          "--dtype=bfloat16", "--attention_impl=xla", "--num_blocks=1", STEP_RESIDUALS), 0.55),
    Part("kernel", "experiments.bench_kernel", ("--reps=10",), ("--shapes=9,4,64,128,float32", "--reps=2"), 0.2),
    Part("decode", "experiments.bench_decode",
         ("--sublayers=32", "--d_model=1280", "--batch=1", "--prompt_length=512", "--window=4096",
          "--new_tokens=64", "--rounds=8", "--dtype=bfloat16", "--num_blocks=8", DECODE_RESIDUALS),
         ("--sublayers=2", "--d_model=64", "--batch=1", "--prompt_length=8", "--window=32", "--new_tokens=4",
          "--rounds=2", "--dtype=bfloat16", "--num_blocks=1", DECODE_RESIDUALS), 0.25),
)


@dataclasses.dataclass
class Output:
  """What one part printed, and why it stopped if it did not finish."""
  stdout: str
  failure: str | None
  seconds: float


def run_part(part: Part, args: list[str], timeout_s: float, platform: str) -> Output:
  """Runs one benchmark in a fresh process on `platform`, killed after `timeout_s`."""
  command = [sys.executable, "-m", part.module, *args]
  env = dict(os.environ, JAX_PLATFORMS=platform)
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
  except subprocess.TimeoutExpired as timeout:  # its output is bytes, whatever text= says
    stdout = (timeout.stdout or b"").decode(errors="replace")
    return Output(stdout, f"timed out after {timeout_s:.0f} s", time.perf_counter() - start)
  failure = None
  if done.returncode:
    last_line = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    failure = f"exit code {done.returncode}: {last_line.strip()[:160]}"
  return Output(done.stdout, failure, time.perf_counter() - start)


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
  """The header and complete rows of the markdown table in `text`."""
  cells = [[cell.strip() for cell in line.strip().strip("|").split("|")]
           for line in text.splitlines() if line.startswith("|")]
  if not cells:
    return [], []
  header = cells[0]
  return header, [row for row in cells[2:] if len(row) == len(header)]


def headings(text: str) -> list[str]:
  """A benchmark's lines naming the device and shapes."""
  return [line for line in text.splitlines() if line.startswith("#") or line.startswith("device:")]


def residual_rows(output: Output, part: str, variants: dict[str, str], cells) -> list[list[str]]:
  """One table row per variant of a benchmark's residual-keyed table: `cells(label, header, row)` gives the
  row after the part's name, or a row saying why it is missing."""
  header, rows = markdown_table(output.stdout)
  by_residual = {row[header.index("residual")]: row for row in rows}
  return [[part, *cells(label, header, by_residual[residual])] if residual in by_residual
          else [part, label, "-", "-", "-", output.failure or "no row printed"]
          for residual, label in variants.items()]


def step_rows(output: Output) -> list[list[str]]:
  def cells(label, header, row):
    at = header.index("step ms")
    block_size = f" (S={row[header.index('S')]})" if row[header.index("residual")].startswith("block") else ""
    return [label + block_size, row[at], row[at + 1], row[header.index("MFU")],
            f"x PreNorm; compile {row[header.index('compile s')]} s, temp {row[header.index('temp MiB')]} MiB"]

  return residual_rows(output, "step", STEP_VARIANTS, cells)


def kernel_rows(output: Output) -> list[list[str]]:
  header, rows = markdown_table(output.stdout)
  shape_columns = ("S", "Q", "M", "d", "dtype", "pass")
  case = lambda row: tuple(row[header.index(column)] for column in shape_columns)
  xla_ms = {case(row): row[header.index("ms")] for row in rows if row[header.index("impl")] == "xla"}
  table = []
  for row in rows:
    if row[header.index("impl")] == "xla":
      continue
    s, q, m, d, dtype, pass_name = case(row)
    table.append(["kernel", f"pallas {pass_name} S={s} Q={q} M={m} d={d} {dtype}", row[header.index("ms")],
                  row[header.index("x xla")], "-",
                  f"xla {xla_ms.get(case(row), '-')} ms / pallas; {row[header.index('% peak')]} % of peak bandwidth"])
  if output.failure or not table:
    table.append(["kernel", "-", "-", "-", "-", output.failure or "no row printed"])
  return table


def decode_rows(output: Output) -> list[list[str]]:
  def cells(label, header, row):
    at, prefill = header.index("decode ms/token"), header.index("prefill ms")
    return [f"{label} ms/token", row[at], row[at + 1], "-",
            f"x PreNorm; prefill {row[prefill]} ms ({row[prefill + 1]} x PreNorm)"]

  return residual_rows(output, "decode", DECODE_VARIANTS, cells)


ROWS = {"step": step_rows, "kernel": kernel_rows, "decode": decode_rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes on CPU (checks the script, not speed)")
  parser.add_argument("--budget_s", type=float, default=450.0, help="seconds for all three parts together")
  parser.add_argument("--platform", default="cuda", help="JAX_PLATFORMS of the benchmarks (--dry_run: cpu)")
  args = parser.parse_args()
  if args.budget_s <= 0:
    parser.error(f"--budget_s={args.budget_s}: must be > 0")
  platform = "cpu" if args.dry_run else args.platform
  deadline = time.perf_counter() + args.budget_s
  context, table, failed = [], [], False
  for index, part in enumerate(PARTS):
    shares_left = sum(p.budget_share for p in PARTS[index:])
    timeout_s = max(1.0, (deadline - time.perf_counter()) * part.budget_share / shares_left)
    output = run_part(part, list(part.dry_run_args if args.dry_run else part.gpu_args), timeout_s, platform)
    print(f"[device_bench] {part.name}: {output.seconds:.0f} s of {timeout_s:.0f}"
          f"{'; ' + output.failure if output.failure else ''}", file=sys.stderr, flush=True)
    failed |= output.failure is not None
    context += [f"{part.name}: {line.lstrip('# ')}" for line in headings(output.stdout)]
    table += ROWS[part.name](output)
  for line in context:
    print(f"# {line}")
  print("| part | case | ms | ratio | MFU | notes |")
  print("|---|---|---|---|---|---|")
  for row in table:
    print("| " + " | ".join(row) + " |")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  cli.run_argparse(main)
