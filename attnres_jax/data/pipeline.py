"""Windows of `seq_len + 1` consecutive tokens, batched and sharded over processes (grain).

Training: the start positions of all windows of a split are shuffled with the
seed (a new permutation each epoch, one epoch = every start once) and repeated
forever. Global batch `g` is elements `[g * G, (g + 1) * G)` of that stream;
process `p` of `P` gets its elements `p, p + P, ...`, so the local batches of
all processes are disjoint and together are the global batch. The iterator's
state is the index of the next batch, so `get_state` / `set_state` (and grain
checkpoints) resume exactly.

Evaluation: a fixed list of batches of evenly spaced windows, sharded the same way.
"""

import functools

import grain
import numpy as np

# Each element is a whole batch: a couple of threads overlap the memmap reads with
# the training step; a short buffer bounds host memory.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _check(tokens: np.ndarray, split: str, seq_len: int, global_batch_size: int, process_index: int,
           process_count: int) -> None:
  if tokens.ndim != 1:
    raise ValueError(f"{split} tokens must be 1-D, got shape {tokens.shape}")
  if tokens.size == 0:
    raise ValueError(f"the {split} split is empty")
  if seq_len < 1 or seq_len + 1 > tokens.size:
    raise ValueError(f"config.data.seq_len={seq_len}: windows of seq_len + 1 tokens must fit the {split} "
                     f"split ({tokens.size} tokens)")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"config.data.global_batch_size={global_batch_size}: must be a positive multiple of "
                     f"the process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}: must be in [0, {process_count})")


def _windows(tokens: np.ndarray, window: int, starts_B: np.ndarray) -> np.ndarray:
  """`[B, window]` int32: `tokens[s : s + window]` for each start `s`."""
  return tokens[starts_B[:, None] + np.arange(window)].astype(np.int32)


def train_iterator(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's `[global_batch_size // process_count, seq_len + 1]` int32 batches."""
  _check(tokens, "train", seq_len, global_batch_size, process_index, process_count)
  starts = grain.MapDataset.range(tokens.size - seq_len).shuffle(seed=seed).repeat()
  local_batches = starts[process_index::process_count].batch(
      global_batch_size // process_count, drop_remainder=True)
  batches = local_batches.map(functools.partial(_windows, tokens, seq_len + 1))
  return iter(batches.to_iter_dataset(READ_OPTIONS))


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """`num_batches` fixed `[global_batch_size // process_count, seq_len + 1]` int32 batches.

  The `num_batches * global_batch_size` windows start at evenly spaced positions
  from the first to the last possible start (windows overlap or repeat when the
  split is short).
  """
  _check(tokens, "val", seq_len, global_batch_size, process_index, process_count)
  if num_batches < 1:
    raise ValueError(f"config.train.eval_batches={num_batches}: must be positive")
  starts_NxG = np.linspace(0, tokens.size - seq_len - 1, num_batches * global_batch_size).round().astype(
      np.int64).reshape(num_batches, global_batch_size)
  return [_windows(tokens, seq_len + 1, starts_G[process_index::process_count]) for starts_G in starts_NxG]
