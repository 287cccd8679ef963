"""`config.train.profile_steps`: a `jax.profiler` trace of some training steps, for TensorBoard's profile plugin.

The trace of steps `first..last` (global step numbers, so a resumed run traces
what is left of the window) is written to `<workdir>/profile/plugins/profile/
<timestamp>/<host>.xplane.pb`; `tensorboard --logdir <workdir>/profile` shows
it (with `tensorboard-plugin-profile` installed).
"""

import os
from types import TracebackType
from typing import Any

import jax
import tqdm


def parse_profile_steps(profile_steps: str) -> tuple[int, int] | None:
  """"first:last" -> (first, last); "" -> None (validated by config_checks)."""
  if not profile_steps:
    return None
  first, last = profile_steps.split(":")
  return int(first), int(last)


class StepProfiler:
  """Starts a trace before step `first` runs and stops it once step `last` has finished.

  A context manager: leaving it (training ended or raised inside the window)
  stops a trace still running.
  """

  def __init__(self, profile_steps: str, workdir: str):
    self.window = parse_profile_steps(profile_steps)
    self.log_dir = os.path.join(os.path.abspath(workdir), "profile")
    self.run_name = os.path.basename(os.path.abspath(workdir))
    self.active = False
    self.first_traced = 0

  def before_step(self, step: int) -> None:
    """Starts the trace if `step` is the first step of the window this run executes."""
    if self.window and not self.active and self.window[0] <= step <= self.window[1]:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
      self.first_traced = step

  def after_step(self, step: int, outputs: Any) -> None:
    """Stops the trace after the window's last step, once its `outputs` are computed."""
    if self.active and step == self.window[1]:
      jax.block_until_ready(outputs)
      self.stop(step)

  def stop(self, last_traced: int | None = None) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    if jax.process_index() == 0:  # through tqdm, which redraws the progress bar below the line
      steps = f"steps {self.first_traced}-{last_traced}" if last_traced else f"from step {self.first_traced}"
      tqdm.tqdm.write(f"[{self.run_name}] profile of {steps} written to {self.log_dir} "
                      f"(tensorboard --logdir {self.log_dir})")

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
    self.stop()
