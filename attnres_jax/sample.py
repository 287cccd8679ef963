"""Generates text from a trained workdir: `python -m attnres_jax.sample --workdir=DIR --prompt="def "`.

Loads the workdir's saved config (`config.json`), its tokenizer (`tokenizer/`,
saved by training: bytes, a BPE, a user's `tokenizer.json`) and its latest
checkpoint, encodes the prompt (an empty prompt starts a new document from the
end-of-document token), and streams the decoded continuation to stdout as it
is sampled (a character appears once its bytes and merges are complete),
stopping at the end of the document unless told otherwise.
"""

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
from attnres_jax.data import corpus
from attnres_jax.data.tokenizer import WORKDIR_TOKENIZER, ByteTokenizer, Tokenizer, load_saved_tokenizer
from attnres_jax.generate import Generator, Sampling
from attnres_jax.sharding import make_mesh
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.optim import make_optimizer
from attnres_jax.train.resume import complete_saved_config
from attnres_jax.train.state import abstract_train_state

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text the generation continues.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate at most.", lower_bound=0)
_STOP_AT_EOD = flags.DEFINE_boolean("stop_at_eod", True, "Stop at the end-of-document token (else go on past it).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this probability mass; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_WINDOW = flags.DEFINE_integer("window", 0, "Attention span of the KV cache; 0 = the training seq_len.",
                               lower_bound=0)
flags.mark_flag_as_required("workdir")


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
  config = ml_collections.ConfigDict(complete_saved_config(saved))
  check_model_config(config.model)
  return config


def load_model(workdir: str, config: ml_collections.ConfigDict):
  """The model with the parameters of the workdir's latest checkpoint, on this machine's first device.

  Only the parameters are read (the optimiser state is skipped), laid out for one device whatever
  mesh trained them. Returns the model and its step.
  """
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  if config.model.depth_attention_impl == "pallas" and jax.default_backend() == "cpu":
    config.model.depth_attention_impl = "xla"  # the same math; the kernel compiles for accelerators only
  if config.model.attention_impl in ("splash", "cudnn"):
    config.model.attention_impl = "auto"  # the same math; each kernel runs on its own platform only
  if config.model.moe.impl == "megablox" and jax.default_backend() != "tpu":
    config.model.moe.impl = "auto"  # the same grouped matmuls; megablox compiles for TPU only
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


def workdir_tokenizer(workdir: str, config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer training saved in the workdir; the stdlib bytes for workdirs older than that record."""
  tokenizer = load_saved_tokenizer(os.path.join(workdir, WORKDIR_TOKENIZER))
  if tokenizer is None and config.data.source == "stdlib" and config.data.tokenizer == "bytes":
    tokenizer = ByteTokenizer(vocab_size=256, eod_id=corpus.BYTES_EOD_ID)
  if tokenizer is None:
    raise FileNotFoundError(f"{workdir} has no {WORKDIR_TOKENIZER}/spec.json, and its corpus does not say how to "
                            f"decode (token files without a tokenizer record): resume the run once with this "
                            f"version to save it")
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f"{workdir}: its tokenizer has {tokenizer.vocab_size} ids, the model "
                     f"{config.model.vocab_size}")
  return tokenizer


def sample(workdir: str) -> None:
  """Prints the prompt and its sampled continuation."""
  config = load_run_config(workdir)
  tokenizer = workdir_tokenizer(workdir, config)
  sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, num_ids=tokenizer.vocab_size)
  prompt_ids = tokenizer.encode_batch([_PROMPT.value.encode("utf-8")])[0] if _PROMPT.value else [tokenizer.eod_id]
  prompt_1xP = np.asarray(prompt_ids, np.int32)[None]
  window = _WINDOW.value or config.data.seq_len
  if not 1 <= prompt_1xP.shape[1] <= window:
    raise ValueError(f"the prompt is {prompt_1xP.shape[1]} tokens; it must be 1 to {window} (the context, "
                     f"--window or the training seq_len)")
  model, step = load_model(workdir, config)
  print(f"# {config.model.residual} model at step {step} (parameters only, on 1 device), {sampling}",
        file=sys.stderr, flush=True)
  decode = tokenizer.stream_decoder()
  sys.stdout.write(_PROMPT.value)
  for tokens_1 in Generator(model, window, sampling).generate(prompt_1xP, _MAX_NEW_TOKENS.value, _SEED.value):
    token = int(tokens_1[0])
    if token == tokenizer.eod_id and _STOP_AT_EOD.value:
      break
    sys.stdout.write(decode(token))
    sys.stdout.flush()
  sys.stdout.write("\n")


if __name__ == "__main__":
  cli.run(main)
