"""The training loop: data, model, optimiser, evaluation, checkpoints and metrics, resumable."""

import functools
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from attnres_jax import data
from attnres_jax.config_checks import check_run_config
from attnres_jax.data.token_files import text_bytes
from attnres_jax.data.tokenizer import WORKDIR_TOKENIZER, Tokenizer, save_tokenizer, tokenizer_from_metadata
from attnres_jax.files import write_json_atomically
from attnres_jax.sharding import activate, batch_sharding, check_mesh_fits, make_mesh, replication_warnings
from attnres_jax.train.checkpoint import Checkpointer
from attnres_jax.train.dynamics import DynamicsLog, make_dynamics_step
from attnres_jax.train.flops import peak_flops_per_device, train_flops_per_token
from attnres_jax.train.metrics import MetricsWriter
from attnres_jax.train.optim import learning_rate_schedule, make_optimizer
from attnres_jax.train.profiling import StepProfiler
from attnres_jax.train.resume import check_resume
from attnres_jax.train.state import abstract_train_state, create_train_state, state_shardings
from attnres_jax.train.steps import make_eval_step, make_train_step


def load_splits_once(config: ml_collections.ConfigDict) -> data.TokenSplits:
  """Process 0 builds the corpus cache (if needed) before the others open it. A `model.vocab_size` of 0
  becomes the data's."""
  if jax.process_index() == 0:
    splits = data.load_splits(config.data, config.model.vocab_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("corpus ready")
  if jax.process_index() != 0:
    splits = data.load_splits(config.data, config.model.vocab_size)
  if not config.model.vocab_size:
    config.model.vocab_size = splits.metadata["vocab_size"]
  return splits


def corpus_tokenizer(config: ml_collections.ConfigDict, splits: data.TokenSplits) -> Tokenizer | None:
  """The tokenizer of the run's corpus (None if its metadata names none); document masking needs one."""
  tokenizer = tokenizer_from_metadata(splits.metadata, splits.directory, where=splits.directory)
  if config.data.document_masking and tokenizer is None:
    raise ValueError(f"config.data.document_masking=True needs the end-of-document id, but "
                     f"{splits.directory}/metadata.json records no tokenizer (attnres_jax/data/token_files.py)")
  return tokenizer


def bits_per_byte(loss_nats: float, metadata: dict) -> float | None:
  """Validation bits per UTF-8 byte: `loss * tokens / bytes / ln 2` (docs/method.md §14); None without
  the bytes."""
  num_bytes = text_bytes(metadata)
  return None if num_bytes is None else loss_nats * metadata["num_tokens"]["val"] / num_bytes["val"] / math.log(2)


def saved_config(workdir: str) -> dict | None:
  """The `config.json` a workdir's last start wrote (the reference for checkpoints that store no config)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` on the configured mesh, resuming from its latest checkpoint.

  Returns the final train and validation losses, and the validation bits per byte where the corpus
  records its bytes.
  """
  check_run_config(config, jax.process_count(), jax.default_backend())
  mesh = make_mesh(config.mesh)
  check_mesh_fits(config, mesh)
  with activate(mesh, config.mesh.rules), StepProfiler(config.train.profile_steps, workdir) as profiler:
    return _train_and_evaluate(config, workdir, mesh, profiler)


def _train_and_evaluate(config, workdir, mesh, profiler) -> dict[str, float]:
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"--workdir={workdir} is a file, not a directory")
  splits = load_splits_once(config)
  tokenizer = corpus_tokenizer(config, splits)
  eod_id = tokenizer.eod_id if config.data.document_masking else None
  os.makedirs(workdir, exist_ok=True)  # after the data checks: a mistake there leaves no empty workdir
  if is_main and tokenizer is not None:
    save_tokenizer(tokenizer, os.path.join(workdir, WORKDIR_TOKENIZER))
  to_global = functools.partial(jax.make_array_from_process_local_data, batch_sharding(mesh, config.mesh.rules))
  data_kwargs = dict(seq_len=config.data.seq_len, global_batch_size=config.data.global_batch_size,
                     process_index=process_index, process_count=process_count)
  train_iterator = data.train_iterator(splits.train, seed=config.data.seed, **data_kwargs)
  eval_batches = data.eval_batches(splits.val, num_batches=config.train.eval_batches, **data_kwargs)

  num_steps = config.train.num_steps
  tx = make_optimizer(config.optim, num_steps)
  graphdef, abstract_state = abstract_train_state(config, mesh, tx)
  checkpointer = Checkpointer(workdir, max_to_keep=config.train.max_to_keep,
                              async_checkpointing=config.train.async_checkpointing)
  run_name = os.path.basename(os.path.abspath(workdir))
  config_json = json.loads(config.to_json_best_effort())

  def check_run(step, saved_run):
    saved = saved_run["config"] if saved_run else saved_config(workdir)
    changed = check_resume(saved, config, step) if saved else []
    if changed and is_main:
      print(f"[{run_name}] resuming step {step} with changed {', '.join(changed)}", flush=True)

  state = checkpointer.restore_latest(abstract_state, train_iterator, check_run=check_run)
  if state is None:  # a new run: only now is a state initialised
    state = create_train_state(config, mesh, tx)[1]
  start_step = int(state.step)

  tokens_per_step = config.data.global_batch_size * config.data.seq_len
  flops_per_token = train_flops_per_token(config.model, config.data.seq_len)
  peak = peak_flops_per_device(jax.devices()[0], config.model.dtype)
  if is_main:
    write_json_atomically(os.path.join(workdir, "config.json"), config_json)
    num_params = sum(np.size(p) for p in jax.tree.leaves(state.params))
    model = config.model
    moe = (f" with MoE FFNs ({model.moe.num_experts} experts, top-{model.moe.top_k}, "
           f"{model.moe.num_shared_experts} shared)" if model.ffn == "moe" else "")
    print(f"[{run_name}] {model.residual} model{moe}, {num_params:,} parameters; {tokens_per_step:,} tokens "
          f"per step, steps {start_step} -> {num_steps}"
          f"{' (resumed)' if start_step else ''}; mesh {dict(mesh.shape)} of {jax.devices()[0].platform} "
          f"devices over {process_count} process(es); "
          f"writing to {os.path.abspath(workdir)}", flush=True)
    for warning in replication_warnings(abstract_state.params):
      print(f"[{run_name}] {warning}", flush=True)

  chunk = config.train.loss_chunk_size
  train_step = make_train_step(graphdef, tx, config.optim.grad_accum_steps, state_shardings(state),
                               loss_chunk_size=chunk, unroll=config.model.unroll_layers, eod_id=eod_id)
  eval_step = make_eval_step(graphdef, loss_chunk_size=chunk, eod_id=eod_id)
  schedule = learning_rate_schedule(config.optim, num_steps)
  writer = MetricsWriter(workdir, run_name=run_name, num_steps=num_steps, start_step=start_step, is_main=is_main)
  dynamics_every = config.train.dynamics_every
  dynamics_step = (make_dynamics_step(graphdef, config.optim.grad_accum_steps, loss_chunk_size=chunk, eod_id=eod_id)
                   if dynamics_every else None)
  dynamics_log = DynamicsLog(workdir, writer.tensorboard if is_main else None, is_main=is_main and dynamics_every > 0)
  final = {}
  pending = None  # (step, metrics, dynamics or None) not read yet: read after the next step is dispatched
  last_log = (start_step, time.perf_counter())

  def settle():
    """Reads the pending step's metrics (blocking), stops on a non-finite loss, logs it."""
    nonlocal pending, last_log
    if pending is None:
      return
    step, metrics, dynamics = pending
    pending = None
    if dynamics is not None:
      dynamics_log.write(step, dynamics)
    metrics = {name: float(value) for name, value in metrics.items()}
    if not all(np.isfinite(value) for value in metrics.values()):
      checkpointer.wait()
      dynamics_log.close()
      writer.close()
      raise FloatingPointError(
          f"Non-finite training metrics at step {step} ({metrics}); stopping without saving this state. "
          f"Checkpoints kept: {checkpointer.manager.all_steps()}.")
    final["train_loss"] = metrics["loss"]
    if step % config.train.log_every == 0 or step == num_steps:
      elapsed = time.perf_counter() - last_log[1]
      tokens_per_s = (step - last_log[0]) * tokens_per_step / max(elapsed, 1e-9)
      last_log = (step, time.perf_counter())
      metrics.update(learning_rate=float(schedule(step - 1)), tokens_per_s=tokens_per_s)
      summary = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
      if "eval_bits_per_byte" in final:
        summary["val bpb"] = f"{final['eval_bits_per_byte']:.3f}"
      if peak:
        metrics["mfu"] = tokens_per_s * flops_per_token / (peak * mesh.size)
        summary["MFU"] = f"{100 * metrics['mfu']:.1f}%"
      writer.write(step, "train", metrics)
      writer.show(step, summary)

  for step in range(start_step + 1, num_steps + 1):
    profiler.before_step(step)
    batch = to_global(next(train_iterator))
    # Dynamics of the parameters this step updates, dispatched before the step (which donates them).
    dynamics = dynamics_step(state.params, batch) if dynamics_every and step % dynamics_every == 0 else None
    state, metrics = train_step(state, batch)
    profiler.after_step(step, (state, metrics))
    checkpointer.seal_finished()
    settle()
    pending = (step, metrics, dynamics)
    if step % config.train.eval_every == 0 or step == num_steps:
      settle()
      final["eval_loss"] = float(np.mean([eval_step(state.params, to_global(b)) for b in eval_batches]))
      eval_metrics = {"loss": final["eval_loss"]}
      bpb = bits_per_byte(final["eval_loss"], splits.metadata)
      if bpb is not None:
        final["eval_bits_per_byte"] = eval_metrics["bits_per_byte"] = bpb
      writer.write(step, "eval", eval_metrics)
      writer.note(f"[{run_name}] step {step}: validation loss {final['eval_loss']:.4f}"
                  + ("" if bpb is None else f", {bpb:.4f} bits per byte"))
    if step % config.train.checkpoint_every == 0 or step == num_steps:
      settle()
      checkpointer.save(state, train_iterator, run={"config": config_json})
  settle()
  checkpointer.close()
  dynamics_log.close()
  writer.close()
  return final
