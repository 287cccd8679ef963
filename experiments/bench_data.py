"""Data throughput: `prepare_data` with bytes and BPE, and the training input pipeline against the train step.

Preparation tokenises the stdlib's source files (about 31 MB, every `*.py` of
this interpreter) into token files in a temporary directory with
`--workers` processes: MB/s of UTF-8 text and tokens/s of the tokenising pass
(BPE: with a tokenizer of `--vocab_size` ids trained on the same files first,
its training time reported apart). The pipeline row reads the default
config's batches from its grain iterator (`data.train_iterator`) and compares
batches/s with the optimiser steps/s of that config's own jitted train step,
measured in the same run.

  python -m experiments.bench_data                       # from the repository root
  python -m experiments.bench_data --workers=2 --vocab_size=16384
"""

import argparse
import os
import tempfile
import time

from attnres_jax import cli, data
from attnres_jax.data import corpus
from attnres_jax.data.documents import InputSpec, list_files
from attnres_jax.data.prepare import TokenizerChoice, make_tokenizer, prepare_corpus
from configs import base


def bench_prepare(choice: TokenizerChoice, inputs: InputSpec, workers: int) -> dict:
  """Seconds to train the tokenizer, and throughput of the tokenising pass."""
  start = time.perf_counter()
  tokenizer = make_tokenizer(choice, inputs, val_fraction=0.02, show_progress=False)
  trained = time.perf_counter()
  with tempfile.TemporaryDirectory() as directory:
    metadata = prepare_corpus(inputs, os.path.join(directory, "tokens"), tokenizer, val_fraction=0.02,
                              workers=workers, provenance={}, show_progress=False)
  seconds = time.perf_counter() - trained
  return {"train_s": trained - start, "MB/s": sum(metadata["num_bytes"].values()) / 1e6 / seconds,
          "tokens/s": sum(metadata["num_tokens"].values()) / seconds}


def bench_pipeline(batches: int) -> tuple[float, float]:
  """Batches/s of the default config's train iterator and steps/s of its train step."""
  # Imported here: spawned tokenizer workers import this module, and prepare_data's own workers load no jax.
  import jax

  from attnres_jax.sharding import activate, make_mesh
  from attnres_jax.train.optim import make_optimizer
  from attnres_jax.train.state import create_train_state, state_shardings
  from attnres_jax.train.steps import make_train_step

  config = base.get_config()
  splits = data.load_splits(config.data, config.model.vocab_size)
  iterator = data.train_iterator(splits.train, seq_len=config.data.seq_len,
                                 global_batch_size=config.data.global_batch_size, seed=0)
  next(iterator)  # threads started, first reads done
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(iterator)
  batches_per_s = batches / (time.perf_counter() - start)
  mesh = make_mesh(config.mesh)
  with activate(mesh, config.mesh.rules):
    tx = make_optimizer(config.optim, config.train.num_steps)
    graphdef, state = create_train_state(config, mesh, tx)
    step = make_train_step(graphdef, tx, 1, state_shardings(state))
    state, metrics = step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    steps = 20
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  return batches_per_s, steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
  parser.add_argument("--vocab_size", type=int, default=4096, help="ids of the BPE trained for the benchmark")
  parser.add_argument("--pipeline_batches", type=int, default=2000, help="batches read from the iterator")
  args = parser.parse_args()
  root = corpus.stdlib_dir()
  rel_paths = tuple(list_files(root, (".py",), corpus.STDLIB_EXCLUDED_DIRS))
  print(f"prepare: {len(rel_paths)} stdlib files, {args.workers} worker(s)")
  print("| tokenizer | train s | MB/s | tokens/s |\n|---|---|---|---|")
  for choice, errors in ((TokenizerChoice("bytes"), "keep"), (TokenizerChoice("bpe", vocab_size=args.vocab_size,
                                                                               bpe_train_bytes=0), "replace")):
    row = bench_prepare(choice, InputSpec(root, rel_paths, errors=errors), args.workers)
    print(f"| {choice.name} | {row['train_s']:.1f} | {row['MB/s']:.1f} | {row['tokens/s']:,.0f} |", flush=True)
  batches_per_s, steps_per_s = bench_pipeline(args.pipeline_batches)
  print("\n| pipeline batches/s | train steps/s (default config) | ratio |\n|---|---|---|")
  print(f"| {batches_per_s:,.0f} | {steps_per_s:.1f} | {batches_per_s / steps_per_s:.0f}x |")


if __name__ == "__main__":
  cli.run_argparse(main)
