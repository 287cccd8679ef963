"""Metrics a person can follow: a live progress bar, metrics.jsonl, TensorBoard, a loss plot.

Only the main process (process 0) writes; every process may call the methods.
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import tensorboardX  # noqa: E402
import tqdm  # noqa: E402


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard event files, and draws progress."""

  def __init__(self, workdir: str, *, run_name: str, num_steps: int, start_step: int, is_main: bool):
    self.is_main = is_main
    self.workdir = workdir
    if not is_main:
      return
    self.jsonl = open_jsonl(os.path.join(workdir, "metrics.jsonl"))
    self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard", run_name))
    self.progress = tqdm.tqdm(total=num_steps, initial=start_step, desc=run_name, unit="step",
                              dynamic_ncols=True, smoothing=0.1)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.is_main:
      return
    record = {"step": step, "split": split, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for name, value in metrics.items():
      self.tensorboard.add_scalar(f"{split}/{name}", float(value), step)

  def show(self, step: int, summary: dict[str, str]) -> None:
    """Moves the progress bar to `step` with a short summary (loss, tokens/s, MFU; tqdm adds the ETA)."""
    if not self.is_main:
      return
    self.progress.update(step - self.progress.n)
    self.progress.set_postfix(summary, refresh=True)

  def note(self, message: str) -> None:
    if self.is_main:
      self.progress.write(message)

  def close(self) -> None:
    if not self.is_main:
      return
    self.progress.close()
    self.tensorboard.close()
    self.jsonl.close()
    plot_losses(self.workdir)


def open_jsonl(path: str):
  """Opens a JSON-lines file for appending, first cutting a partial last line (a run killed mid-write)."""
  if os.path.exists(path):
    with open(path, "rb+") as f:
      content = f.read()
      if content and not content.endswith(b"\n"):
        f.truncate(content.rfind(b"\n") + 1)
  return open(path, "a", encoding="utf-8")


def read_metrics(workdir: str) -> list[dict]:
  """Records of metrics.jsonl; for a step logged twice (a resumed run), the later record wins."""
  latest = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as lines:
    for line in lines:
      record = json.loads(line)
      latest[(record["split"], record["step"])] = record
  return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))


def plot_losses(workdir: str) -> str:
  """Draws train and validation loss against step into `<workdir>/loss.png`, and validation bits per
  byte beside them where the run recorded them."""
  records = read_metrics(workdir)
  bpb_points = [(r["step"], r["bits_per_byte"]) for r in records if r["split"] == "eval" and "bits_per_byte" in r]
  figure, axes = plt.subplots(1, 2 if bpb_points else 1, figsize=(12 if bpb_points else 7, 4.5), squeeze=False)
  axis = axes[0, 0]
  for split, style in (("train", "-"), ("eval", "o-")):
    points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
    if points:
      axis.plot(*zip(*points), style, label=f"{split} loss", markersize=4)
  axis.set_ylabel("next-token cross-entropy (nats)")
  axis.legend()
  if bpb_points:
    axes[0, 1].plot(*zip(*bpb_points), "o-", color="C1", markersize=4)
    axes[0, 1].set_ylabel("validation bits per byte")
  for axis in axes[0]:
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
  figure.suptitle(os.path.basename(os.path.abspath(workdir)))
  path = os.path.join(workdir, "loss.png")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
