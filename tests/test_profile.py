"""`config.train.profile_steps`: a jax.profiler trace of exactly the chosen steps, in the workdir."""

import glob
import gzip
import json
import os

import jax
import numpy as np
import pytest

from attnres_jax.data.token_files import write_token_files
from attnres_jax.train.loop import train_and_evaluate
from attnres_jax.train.profiling import StepProfiler
from configs import smoke


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tokens") / "corpus")
  tokens = np.random.default_rng(0).integers(0, 256, 20_000)
  write_token_files(directory, tokens[:16_000], tokens[16_000:], vocab_size=256, provenance={})
  return directory


def tiny_run_config(path: str, profile_steps: str):
  config = smoke.get_config()
  config.data.update(dict(source="token_files", path=path))
  config.train.update(dict(num_steps=4, eval_every=4, checkpoint_every=4, dynamics_every=0,
                           async_checkpointing=False, profile_steps=profile_steps))
  return config


def traces(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))


def trace_events(trace: str) -> list[dict]:
  """The events of the Chrome trace jax writes beside `<host>.xplane.pb`."""
  with gzip.open(trace.replace(".xplane.pb", ".trace.json.gz"), "rt") as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def dispatch_starts(events: list[dict], name: str) -> list[float]:
  """Start times of the calls of jitted `name` (nested events of one call merged)."""
  starts, end = [], -1.0
  for event in sorted((e for e in events if e["name"] == f"PjitFunction({name})"), key=lambda e: e["ts"]):
    if event["ts"] > end:
      starts.append(event["ts"])
    end = max(end, event["ts"] + event["dur"])
  return starts


def ops_per_run(events: list[dict], module: str) -> list[int]:
  """XLA ops executed by each run of compiled `module` in the trace, runs in order of their first op."""
  runs = {}
  for event in sorted(events, key=lambda e: e["ts"]):
    if event.get("args", {}).get("hlo_module") == module:
      runs[event["args"]["run_id"]] = runs.get(event["args"]["run_id"], 0) + 1
  return list(runs.values())


def test_profile_steps_trace_holds_exactly_the_window_and_its_device_work(tmp_path, tiny_tokens):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_run_config(tiny_tokens, "2:3"), workdir)
  [trace] = traces(workdir)
  events = trace_events(trace)
  assert len(dispatch_starts(events, "train_step")) == 2  # steps 2 and 3 of 4
  *_, step2_ops, step3_ops = ops_per_run(events, "jit_train_step")  # step 1's tail may come first
  assert step3_ops == step2_ops > 100  # the last step's computation finished inside the trace


def test_no_profile_steps_writes_no_trace(tmp_path, tiny_tokens):
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_run_config(tiny_tokens, ""), workdir)
  assert not os.path.exists(os.path.join(workdir, "profile"))


def test_resumed_run_traces_the_rest_of_the_window_by_global_step(tmp_path):
  profiler = StepProfiler("3:5", str(tmp_path))
  profiler.before_step(4)  # a run resumed from step 3: its first step is inside the window
  assert profiler.active
  profiler.after_step(4, jax.numpy.ones(2))
  assert profiler.active
  profiler.after_step(5, jax.numpy.ones(2))
  assert not profiler.active and len(traces(str(tmp_path))) == 1
  late = StepProfiler("3:5", str(tmp_path / "late"))
  late.before_step(6)  # resumed past the window
  assert not late.active


def test_error_inside_the_window_stops_the_trace(tmp_path):
  with pytest.raises(RuntimeError, match="inside the window"):
    with StepProfiler("1:5", str(tmp_path / "first")) as profiler:
      profiler.before_step(1)
      raise RuntimeError("inside the window")
  assert len(traces(str(tmp_path / "first"))) == 1
  jax.profiler.start_trace(str(tmp_path / "second"))  # would fail if a trace were still running
  jax.profiler.stop_trace()
