"""Pre-tokenised corpora on disk ("token files"): writing them atomically, opening them checked.

Format: a directory holding

- `train.bin`, `val.bin`: the token ids of each split, one flat array of
  little-endian unsigned integers (`uint16` or `uint32`), no header. Documents
  are simply concatenated (a tokenizer may put its own separator token in
  between); training windows may cross document boundaries.
- `metadata.json`: a JSON object with at least
  - `vocab_size` (int): every token id is `< vocab_size`,
  - `dtype` (`"uint16"` or `"uint32"`): the element type of both `.bin` files,
  - `num_tokens` (`{"train": int, "val": int}`): file size / dtype size,
  and optionally
  - `max_token_id` (`{"train": int, "val": int}`): the largest id in each
    split. `open_token_files` checks it against the vocabulary and checks a
    sample of each file (a few MB) against it; without it, it reads both splits
    in full at every start and logs the line to add,
  and any other fields. `TokenFileWriter` writes `max_token_id` and
  - `sha256` (`{"train": hex, "val": hex}`): digest of each `.bin` file's bytes
    (`sha256sum train.bin` gives the same),
  - `provenance` (object): free-form description of where the tokens came from.

`prepare_data` also writes
  - `tokenizer` (object): the tokenizer's record (`tokenizer.py`: `kind`,
    `vocab_size`, `eod_id`, `eod_token`, `file`, an HF `tokenizer.json` in the
    directory); `sample` decodes with it, and document masking finds the
    end-of-document id in it,
  - `num_bytes` (`{"train": int, "val": int}`): UTF-8 bytes of the text of each
    split, from which validation reports bits per byte,
  - `documents` (`{"train": int, "val": int}`).

Any tokenizer can produce this format (`write_token_files` takes numpy arrays);
`prepare_data.py` makes it from text, JSON Lines or Parquet files. The
writer builds the directory under a temporary name next to the target,
`.<name>.tmp-<pid>-*`, and renames it into place when complete, so a killed
write never leaves a half-written directory at the target path; the next
writer of that target deletes the temporary directories of writers no longer
running. `open_token_files` memory-maps the splits and checks them against
the metadata and the model's vocabulary.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
METADATA = "metadata.json"
SAMPLE_CHUNKS = 8  # evenly spaced chunks of a split, the first and last included, checked against max_token_id
SAMPLE_CHUNK_BYTES = 1 << 19  # 512 KiB: a sample reads 4 MiB of a split at most
SCAN_CHUNK_BYTES = 1 << 26  # at a time, reading all of a split whose metadata has no max_token_id


class TokenSplits(NamedTuple):
  """The token ids of both splits (read-only memmaps, 1-D), the directory's metadata and its path."""

  train: np.ndarray
  val: np.ndarray
  metadata: dict[str, Any]
  directory: str


def text_bytes(metadata: Mapping[str, Any]) -> dict[str, int] | None:
  """UTF-8 bytes of each split's text: `num_bytes`, or the `bytes` of older byte corpora's provenance."""
  recorded = metadata.get("num_bytes") or (metadata.get("provenance") or {}).get("bytes")
  if isinstance(recorded, dict) and all(isinstance(recorded.get(split), int) and recorded[split] > 0
                                        for split in SPLITS):
    return {split: recorded[split] for split in SPLITS}
  return None


def dtype_for_vocab(vocab_size: int) -> str:
  """The smallest on-disk dtype name that holds every id below `vocab_size`."""
  if not 0 < vocab_size <= 2**32:
    raise ValueError(f"vocab_size={vocab_size}: must be in [1, 2**32]")
  return "uint16" if vocab_size <= 2**16 else "uint32"


def split_file(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.bin")


class TokenFileWriter:
  """Streams token chunks into a new token-files directory; `commit` publishes it.

  Use as a context manager: leaving the block without `commit` (an exception)
  deletes the temporary directory and leaves the target untouched. An existing
  token-files directory at the target is replaced on commit; any other
  non-empty directory there is refused.
  """

  def __init__(self, directory: str, *, vocab_size: int):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.vocab_size = vocab_size
    self.dtype = dtype_for_vocab(vocab_size)
    self._temp_dir: str | None = None
    self._files: dict[str, Any] = {}
    self._hashes = {split: hashlib.sha256() for split in SPLITS}
    self._num_tokens = dict.fromkeys(SPLITS, 0)
    self._max_token_id = dict.fromkeys(SPLITS, 0)

  def __enter__(self) -> "TokenFileWriter":
    check_replaceable(self.directory)
    parent, name = os.path.split(self.directory)
    os.makedirs(parent, exist_ok=True)
    remove_abandoned_builds(parent, name)
    self._temp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    self._files = {split: open(split_file(self._temp_dir, split), "wb") for split in SPLITS}
    return self

  def write(self, split: str, tokens: np.ndarray) -> None:
    """Appends a 1-D array of non-negative integer token ids to `split`."""
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size:
      smallest, largest = int(tokens.min()), int(tokens.max())
      if smallest < 0 or largest >= self.vocab_size:
        raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{smallest}, {largest}]")
      self._max_token_id[split] = max(largest, self._max_token_id[split])
    data = tokens.astype(DTYPES[self.dtype]).tobytes()
    self._files[split].write(data)
    self._hashes[split].update(data)
    self._num_tokens[split] += tokens.size

  @property
  def staging_dir(self) -> str:
    """The directory being built: files written here (a tokenizer's) are published with the token files."""
    return self._temp_dir

  @property
  def num_tokens(self) -> dict[str, int]:
    return dict(self._num_tokens)

  def commit(self, provenance: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """Writes `metadata.json` (with `fields` at its top level), moves the directory into place and returns
    the metadata."""
    for file in self._files.values():
      file.flush()
      os.fsync(file.fileno())
      file.close()
    metadata = {
        "vocab_size": self.vocab_size,
        "dtype": self.dtype,
        "num_tokens": dict(self._num_tokens),
        "max_token_id": dict(self._max_token_id),
        "sha256": {split: digest.hexdigest() for split, digest in self._hashes.items()},
        "provenance": dict(provenance),
        **fields,
    }
    with open(os.path.join(self._temp_dir, METADATA), "w", encoding="utf-8") as file:
      json.dump(metadata, file, indent=2)
      file.write("\n")
    os.chmod(self._temp_dir, 0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    old = f"{self._temp_dir}.old"
    if os.path.isdir(self.directory):
      os.replace(self.directory, old)
    try:
      os.replace(self._temp_dir, self.directory)
    except OSError:  # a concurrent build (another run or process) got there first
      if (read_metadata(self.directory) or {}).get("sha256") != metadata["sha256"]:
        raise
      shutil.rmtree(self._temp_dir, ignore_errors=True)
    self._temp_dir = None
    shutil.rmtree(old, ignore_errors=True)
    return metadata

  def __exit__(self, *exc_info) -> None:
    for file in self._files.values():
      file.close()
    if self._temp_dir is not None:
      shutil.rmtree(self._temp_dir, ignore_errors=True)


def check_replaceable(directory: str) -> None:
  """Raises FileExistsError unless `directory` is absent, empty or a token-files directory."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise FileExistsError(f"{directory} is a file, not a token-files directory; refusing to replace it")
  if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, METADATA)):
    raise FileExistsError(f"{directory} exists and is not a token-files directory (no {METADATA}); refusing to "
                          f"replace it")


def remove_abandoned_builds(parent: str, name: str) -> None:
  """Deletes the temporary directories that writers of `parent/name` killed before their commit left
  (`.{name}.tmp-{pid}-*` of processes no longer running on this machine)."""
  for entry in os.listdir(parent):
    match = re.fullmatch(rf"\.{re.escape(name)}\.tmp-(\d+)-.*", entry)
    if match and not _process_exists(int(match.group(1))):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # PermissionError: alive, another user's
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def write_token_files(directory: str, train: np.ndarray, val: np.ndarray, *, vocab_size: int,
                      provenance: Mapping[str, Any]) -> dict[str, Any]:
  """Writes both splits as a token-files directory (atomically); returns its metadata."""
  with TokenFileWriter(directory, vocab_size=vocab_size) as writer:
    writer.write("train", train)
    writer.write("val", val)
    return writer.commit(provenance)


def read_metadata(directory: str) -> dict[str, Any] | None:
  """The parsed `metadata.json` of `directory`, or None if it is missing or unreadable."""
  try:
    with open(os.path.join(directory, METADATA), encoding="utf-8") as file:
      metadata = json.load(file)
  except (OSError, ValueError):
    return None
  return metadata if isinstance(metadata, dict) else None


def sample_ranges(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
  """The `[start, stop)` ranges of a split's check sample: `SAMPLE_CHUNKS` evenly spaced chunks of
  `chunk_tokens`, the first and the last included; the whole split if that is not more."""
  if num_tokens <= SAMPLE_CHUNKS * chunk_tokens:
    return [(0, num_tokens)]
  starts = np.linspace(0, num_tokens - chunk_tokens, SAMPLE_CHUNKS).round().astype(int)
  return [(int(start), int(start) + chunk_tokens) for start in starts]


def _largest_id(tokens: np.ndarray, ranges: list[tuple[int, int]]) -> int:
  """The largest id of `tokens` in the `[start, stop)` ranges, read one range at a time."""
  return max(int(tokens[start:stop].max()) for start, stop in ranges)


def _recorded_max_token_id(metadata: dict[str, Any], where: str) -> dict[str, int] | None:
  """The metadata's `max_token_id` (checked), or None if it has none."""
  recorded = metadata.get("max_token_id")
  if recorded is not None and not (isinstance(recorded, dict) and all(
      isinstance(recorded.get(split), int) and recorded[split] >= 0 for split in SPLITS)):
    raise ValueError(f"{where}: {METADATA} max_token_id={recorded!r} must give a non-negative integer "
                     f"for each of {SPLITS}")
  return recorded


def open_token_files(directory: str, *, vocab_size: int, field: str = "config.data.path") -> TokenSplits:
  """Memory-maps both splits of a token-files directory, checked against the metadata.

  `vocab_size` is the model's (0: the metadata's): the metadata's may not
  exceed it and no token id may reach it. The ids are checked through the metadata's `max_token_id` and
  a sample of each file; without it, by reading both splits in full. Errors
  name `field`, the config value that chose `directory`.
  """
  where = f"{field}={directory!r}"
  directory = os.path.expanduser(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{where}: no such directory")
  if not os.path.isfile(os.path.join(directory, METADATA)):
    raise FileNotFoundError(f"{where}: no {METADATA} (see attnres_jax/data/token_files.py for the format)")
  metadata = read_metadata(directory)
  if metadata is None:
    raise ValueError(f"{where}: {METADATA} is unreadable: not valid JSON, or not a JSON object")
  missing = [key for key in ("vocab_size", "dtype", "num_tokens") if key not in metadata]
  if missing:
    raise ValueError(f"{where}: {METADATA} lacks {missing}")
  if not isinstance(metadata["vocab_size"], int) or not isinstance(metadata["num_tokens"], dict):
    raise ValueError(f"{where}: {METADATA} needs an integer vocab_size and a num_tokens object")
  if metadata["dtype"] not in DTYPES:
    raise ValueError(f"{where}: {METADATA} dtype={metadata['dtype']!r} must be one of {tuple(DTYPES)}")
  data_vocab_size = metadata["vocab_size"]
  if vocab_size and data_vocab_size > vocab_size:
    raise ValueError(f"{where}: {METADATA} vocab_size={data_vocab_size} exceeds "
                     f"config.model.vocab_size={vocab_size}; set it to {data_vocab_size}, or to 0 to take the "
                     f"data's")
  dtype = DTYPES[metadata["dtype"]]
  recorded = _recorded_max_token_id(metadata, where)
  scanned, splits = {}, {}
  for split in SPLITS:
    path = split_file(directory, split)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: no {split}.bin")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
      raise ValueError(f"{where}: {split}.bin has {size} bytes, not a multiple of {metadata['dtype']} "
                       f"({dtype.itemsize} bytes)")
    num_tokens = size // dtype.itemsize
    expected = metadata["num_tokens"].get(split)
    if num_tokens != expected:
      raise ValueError(f"{where}: {split}.bin holds {num_tokens} tokens, {METADATA} says {expected}")
    if num_tokens == 0:
      raise ValueError(f"{where}: the {split} split is empty")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if recorded is None:
      scan_tokens = SCAN_CHUNK_BYTES // dtype.itemsize
      largest = scanned[split] = _largest_id(
          tokens, [(start, start + scan_tokens) for start in range(0, num_tokens, scan_tokens)])
    else:
      largest = recorded[split]
    if largest >= data_vocab_size:
      raise ValueError(f"{where}: {split}.bin holds token id {largest} >= vocab_size={data_vocab_size} "
                       f"({METADATA}; config.model.vocab_size={vocab_size})")
    if recorded is not None:
      sampled = _largest_id(tokens, sample_ranges(num_tokens, SAMPLE_CHUNK_BYTES // dtype.itemsize))
      if sampled > largest:
        raise ValueError(f"{where}: {split}.bin holds token id {sampled}, above its max_token_id={largest} "
                         f"in {METADATA}: the file does not match its metadata")
    splits[split] = tokens
  if scanned:
    logging.warning("%s: %s has no max_token_id, so both splits were read in full to check their token ids; "
                    "add \"max_token_id\": %s to it to check them from the metadata at every start", where,
                    METADATA, json.dumps(scanned))
  return TokenSplits(splits["train"], splits["val"], metadata, directory)
