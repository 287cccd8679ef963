"""Plots of training dynamics (docs/method.md §10, the paper's Figures 5 and 8) from workdirs.

  python -m experiments.plot_dynamics --workdir=runs/prenorm --compare=runs/block --compare=runs/full

Reads each run's `dynamics.jsonl` (train with `config.train.dynamics_every > 0`)
at `--step` (default: each run's latest record) and writes, into `--out`
(default `<workdir>/plots`):
- `magnitude_vs_depth.png`: every sublayer's output RMS, one line per run;
- `grad_norm_vs_depth.png`: the gradient norm of every sublayer's weights;
- `depth_weights_<run>.png` for each AttnRes run: token-averaged depth weights,
  target sublayer x source, pre-attention and pre-MLP side by side.

`--window_share=W` also prints, for each Full AttnRes run, how much depth weight
goes to the outputs a window of the `W` newest (the Table 4 sliding window,
docs/method.md §12.7) would hide: the embedding and the `W` newest stay visible.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from attnres_jax import cli  # noqa: E402
from attnres_jax.train.dynamics import read_dynamics  # noqa: E402


def run_names(workdirs: list[str]) -> list[str]:
  """The shortest trailing parts of the workdirs' paths that tell them apart, joined by "_" (`a/full/seed0` and
  `a/block/seed0` are `full_seed0` and `block_seed0`)."""
  parts = [os.path.abspath(workdir).split(os.sep) for workdir in workdirs]
  for length in range(1, max(map(len, parts)) + 1):
    names = ["_".join(p[-length:]).strip("_") for p in parts]
    if len(set(names)) == len(names):
      return names
  raise ValueError(f"the same workdir is given twice: {workdirs}")


def load_run(workdir: str, name: str, step: int | None) -> dict:
  """The run's label, model config and dynamics record at `step` (None: the latest)."""
  records = read_dynamics(workdir)
  if step is None:
    record = records[-1]
  else:
    matches = [r for r in records if r["step"] == step]
    if not matches:
      raise ValueError(f"{workdir}: no dynamics at step {step}; logged steps: {[r['step'] for r in records]}")
    record = matches[0]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    model = json.load(f)["model"]
  return {"name": name, "label": f"{name} ({model['residual']})", "model": model, "record": record}


def plot_against_depth(runs: list[dict], key: str, ylabel: str, title: str, path: str) -> None:
  figure, axis = plt.subplots(figsize=(8, 4.5))
  for run in runs:
    values = run["record"][key]
    axis.plot(np.arange(len(values)), values, "o-", markersize=3, label=f"{run['label']}, step {run['record']['step']}")
  axis.set_yscale("log")
  axis.set_xlabel("sublayer (even: attention, odd: MLP)")
  axis.set_ylabel(ylabel)
  axis.set_title(title)
  axis.grid(alpha=0.3, which="both")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def source_labels(model: dict, num_columns: int) -> list[str]:
  """Columns of `depth_weights`: b_0 (the embedding), the blocks (Full: the sublayer outputs), the partial sum."""
  unit = "v" if model["residual"] == "full" else "b"
  return ["emb"] + [f"{unit}{i}" for i in range(1, num_columns - 1)] + ["partial"]


def plot_depth_weights(run: dict, path: str) -> None:
  weights_LxS = run["record"]["depth_weights"]
  labels = source_labels(run["model"], weights_LxS.shape[1])
  if run["model"]["residual"] == "full":  # Full AttnRes seals every output: the partial is never a source
    weights_LxS, labels = weights_LxS[:, :-1], labels[:-1]
  figure, panels = plt.subplots(1, 2, figsize=(11, 5.5), sharey=True, layout="constrained")
  vmin, vmax = min(0.0, float(weights_LxS.min())), float(weights_LxS.max())  # DenseFormer weights can be < 0
  colormap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: not a source of that sublayer
  for panel, (name, rows) in zip(panels, (("pre-attention", weights_LxS[0::2]), ("pre-MLP", weights_LxS[1::2]))):
    image = panel.imshow(np.ma.masked_equal(rows, 0.0), cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto",
                         interpolation="nearest")
    panel.set_title(f"{name} depth weights")
    panel.set_xlabel("source (grey: not visible)")
    panel.set_xticks(np.arange(len(labels)), labels, rotation=90, fontsize=8)
    panel.set_yticks(np.arange(rows.shape[0]))
  panels[0].set_ylabel("transformer layer")
  figure.colorbar(image, ax=panels, label="token-averaged weight")
  figure.suptitle(f"{run['label']}, step {run['record']['step']}")
  figure.savefig(path, dpi=110)
  plt.close(figure)


def beyond_window_share(run: dict, window: int) -> np.ndarray:
  """Full AttnRes: per mixture (every sublayer's input, then the output) the token-averaged weight on outputs
  older than the `window` newest, the embedding excluded (what the depth window would hide)."""
  if run["model"]["residual"] != "full":
    raise ValueError(f"{run['name']}: --window_share needs a Full AttnRes run, not {run['model']['residual']}")
  rows = list(run["record"]["depth_weights"]) + [run["record"]["output_depth_weights"]]
  # mixture t sees the embedding (column 0) and the outputs 1 .. t; the window keeps t - window + 1 .. t
  return np.array([float(np.sum(weights[1:max(1, t + 1 - window)])) for t, weights in enumerate(rows)])


def window_share_table(runs: list[dict], window: int) -> str:
  lines = [f"| run | step | weight beyond the {window} newest outputs: mean over the sublayers that have such "
           f"outputs | max | output mixture |", "|---|---|---|---|---|"]
  for run in runs:
    share = beyond_window_share(run, window)
    hidden = share[window + 1:-1]  # the sublayers with an output older than the window
    lines.append(f"| {run['name']} | {run['record']['step']} | {hidden.mean():.3f} | {hidden.max():.3f} | "
                 f"{share[-1]:.3f} |")
  return "\n".join(lines) + "\n"


def plot_runs(workdirs: list[str], out: str, step: int | None = None) -> list[str]:
  """Writes the figures for `workdirs` into `out`; returns their paths."""
  runs = [load_run(workdir, name, step) for workdir, name in zip(workdirs, run_names(workdirs))]
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, "magnitude_vs_depth.png"), os.path.join(out, "grad_norm_vs_depth.png")]
  plot_against_depth(runs, "output_rms", "output RMS", "Sublayer output magnitude vs depth", paths[0])
  plot_against_depth(runs, "grad_norm", "gradient norm of the sublayer's weights", "Gradient norm vs depth",
                     paths[1])
  for run in runs:
    if "depth_weights" in run["record"]:
      paths.append(os.path.join(out, f"depth_weights_{run['name']}.png"))
      plot_depth_weights(run, paths[-1])
  return paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training workdir with dynamics.jsonl")
  parser.add_argument("--compare", action="append", default=[], help="more workdirs drawn on the same figures")
  parser.add_argument("--out", default="", help="output directory (default: <workdir>/plots)")
  parser.add_argument("--step", type=int, default=None, help="the logged step to draw (default: each run's latest)")
  parser.add_argument("--window_share", type=int, default=0,
                      help="W > 0: print the depth weight Full AttnRes runs give outputs older than the W newest")
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir, "plots")
  workdirs = [args.workdir] + args.compare
  for path in plot_runs(workdirs, out, args.step):
    print(path)
  if args.window_share:
    print(window_share_table([load_run(w, n, args.step) for w, n in zip(workdirs, run_names(workdirs))],
                             args.window_share))


if __name__ == "__main__":
  cli.run_argparse(main)
