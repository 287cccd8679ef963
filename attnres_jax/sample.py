"""Generates text from a trained workdir: `python -m attnres_jax.sample --workdir=DIR --prompt="def "`.

Loads the workdir's saved config (`config.json`) and its latest checkpoint,
encodes the prompt as UTF-8 bytes (the byte-level corpora of
`attnres_jax.data`), and streams the sampled continuation to stdout.
"""

import codecs
import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from attnres_jax import cli
from attnres_jax.config_checks import check_model_config
from attnres_jax.data.corpus import VOCAB_SIZE
from attnres_jax.generate import Generator, Sampling
from attnres_jax.sharding import make_mesh
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.optim import make_optimizer
from attnres_jax.train.state import abstract_train_state

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text the generation continues.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this probability mass; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_WINDOW = flags.DEFINE_integer("window", 0, "Attention span of the KV cache; 0 = the training seq_len.",
                               lower_bound=0)
flags.mark_flag_as_required("workdir")


# Fields added to the config after workdirs were first written, and the value that reproduces those runs.
ADDED_FIELDS = {"model": {"attention_impl": "xla", "unroll_layers": False, "depth_scan_segments": 1},
                "train": {"loss_chunk_size": 0, "profile_steps": ""}}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (older ones completed by `ADDED_FIELDS`); a clear error if it is
  not a training workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} has no config.json: not a training workdir "
                            f"(train one with python -m attnres_jax.main --config=... --workdir={workdir})")
  with open(path, encoding="utf-8") as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON ({error}): not a config this project wrote") from error
  for section, fields in ADDED_FIELDS.items():
    if isinstance(saved.get(section), dict):
      saved[section] = {**fields, **saved[section]}
  config = ml_collections.ConfigDict(saved)
  check_model_config(config.model)
  return config


def load_model(workdir: str, config: ml_collections.ConfigDict):
  """The model with the parameters of the workdir's latest checkpoint, on this machine's first device.

  Only the parameters are read (the optimiser state is skipped), laid out for one device whatever
  mesh trained them. Returns the model and its step.
  """
  config.mesh.update(data=1, fsdp=1, tensor=1)
  if config.model.depth_attention_impl == "pallas" and jax.default_backend() == "cpu":
    config.model.depth_attention_impl = "xla"  # the same math; the kernel compiles for accelerators only
  if config.model.attention_impl in ("splash", "cudnn"):
    config.model.attention_impl = "auto"  # the same math; each kernel runs on its own platform only
  tx = make_optimizer(config.optim, config.train.num_steps)
  graphdef, abstract = abstract_train_state(config, make_mesh(config.mesh), tx)
  checkpointer = Checkpointer(workdir, max_to_keep=config.train.max_to_keep, async_checkpointing=False,
                              read_only=True)
  restored = checkpointer.restore_params(abstract.params)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint in {checkpointer.directory}")
  step, params = restored
  return nnx.merge(graphdef, params), step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  sample(_WORKDIR.value)


def sample(workdir: str) -> None:
  """Prints the prompt and its sampled continuation."""
  config = load_run_config(workdir)
  if config.model.vocab_size != VOCAB_SIZE:
    raise ValueError(f"prompts are encoded as UTF-8 bytes, but this model has vocab_size="
                     f"{config.model.vocab_size} (trained on another tokenizer's token files)")
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  prompt_1xP = np.frombuffer(_PROMPT.value.encode("utf-8"), np.uint8).astype(np.int32)[None]
  window = _WINDOW.value or config.data.seq_len
  if not 1 <= prompt_1xP.shape[1] <= window:
    raise ValueError(f"the prompt is {prompt_1xP.shape[1]} bytes; it must be 1 to {window} (the context, "
                     f"--window or the training seq_len)")
  model, step = load_model(workdir, config)
  print(f"# {config.model.residual} model at step {step} (parameters only, on 1 device), {sampling}",
        file=sys.stderr, flush=True)
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
  sys.stdout.write(_PROMPT.value)
  for tokens_1 in Generator(model, window, sampling).generate(prompt_1xP, _MAX_NEW_TOKENS.value, _SEED.value):
    sys.stdout.write(decoder.decode(bytes([int(tokens_1[0])])))
    sys.stdout.flush()
  sys.stdout.write(decoder.decode(b"", final=True) + "\n")


if __name__ == "__main__":
  cli.run(main)
