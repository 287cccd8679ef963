"""Documents -> a token-files directory (docs/method.md §14): tokenised in worker processes, streamed to disk.

The main process reads the documents (`documents.py`) and cuts them into
chunks of about `CHUNK_BYTES` of text; a pool of worker processes tokenises the
chunks, at most two per worker in flight, and returns them in order; each
document's ids and one end-of-document id go to its split (chosen by the hash
of its key) through a `TokenFileWriter`. Memory stays bounded whatever the
corpus size. Workers are spawned, not forked: a fork of a process running jax
or HF tokenizers' threads can deadlock.

A byte-level BPE (`tokenizer="bpe"`) is trained first, on the train split's
documents only (the first `bpe_train_bytes` of them, in file order), in a
pass of its own, so that a bad record stops the run before any token is
written. The metadata records the tokenizer (`tokenizer.py`'s `spec()`, the
HF file saved beside the token files as `tokenizer.json`), the documents and
the UTF-8 bytes of each split (`num_bytes`, for bits per byte).
"""

import collections
import dataclasses
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tqdm

from attnres_jax.data.documents import Document, InputSpec, check_inputs, in_validation, read_documents
from attnres_jax.data.token_files import SPLITS, TokenFileWriter
from attnres_jax.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, check_bpe_vocab_size,
                                        tokenizer_from_json, train_bpe)

CHUNK_BYTES = 1 << 20  # text per task of a worker
CHUNKS_IN_FLIGHT_PER_WORKER = 2


@dataclasses.dataclass(frozen=True)
class TokenizerChoice:
  """Which tokenizer `prepare_corpus` uses."""

  name: str = "bytes"  # bytes | bpe (trained on the input) | path of a tokenizer.json
  vocab_size: int = 16_384  # bpe: ids of the trained tokenizer
  bpe_train_bytes: int = 1 << 30  # bpe: text it trains on, from the start of the train split; 0 = all
  eod_token: str = ""  # a tokenizer file's end-of-document token; "" = the first of EOD_CANDIDATES it has


def make_tokenizer(choice: TokenizerChoice, inputs: InputSpec, *, val_fraction: float,
                   show_progress: bool = True) -> Tokenizer:
  """The tokenizer `choice` names; a BPE is trained on the train split of `inputs` (checked by `check_inputs`)."""
  if choice.name == "bytes":
    return ByteTokenizer()
  if inputs.errors == "keep":
    raise ValueError("--errors=keep passes bytes that may not be UTF-8, which only --tokenizer=bytes takes")
  if choice.name != "bpe":
    return HFTokenizer.from_file(choice.name, eod_token=choice.eod_token)
  if choice.bpe_train_bytes < 0:
    raise ValueError(f"--bpe_train_bytes={choice.bpe_train_bytes}: must be >= 0 (0 = the whole train split)")
  check_bpe_vocab_size(choice.vocab_size)
  with tqdm.tqdm(desc="BPE: reading the train split", total=_disk_bytes(inputs), unit="B", unit_scale=True,
                 disable=not show_progress) as progress:
    texts = _training_texts(inputs, val_fraction, choice.bpe_train_bytes, progress)
    return train_bpe(texts, vocab_size=choice.vocab_size, show_progress=show_progress)


def _training_texts(inputs: InputSpec, val_fraction: float, budget_bytes: int, progress: tqdm.tqdm
                    ) -> Iterator[str]:
  taken = 0
  for document in read_documents(inputs, progress.update):
    if not in_validation(document.key, val_fraction):
      yield document.data.decode("utf-8")
      taken += len(document.data)
      if budget_bytes and taken >= budget_bytes:
        return


def prepare_corpus(inputs: InputSpec, output_dir: str, tokenizer: Tokenizer, *, val_fraction: float,
                   workers: int, provenance: Mapping[str, Any], show_progress: bool = True) -> dict[str, Any]:
  """Tokenises every document of `inputs` into the token-files directory `output_dir`; returns its metadata.

  `workers` > 1 tokenises in that many processes (else in this one). Raises
  ValueError, leaving `output_dir` untouched, for a bad input or when a split
  gets no document.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
  if workers < 0:
    raise ValueError(f"--workers={workers}: must be >= 0 (0 or 1: tokenise in this process)")
  check_inputs(inputs)
  documents, num_bytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
  with TokenFileWriter(output_dir, vocab_size=tokenizer.vocab_size) as writer, \
      _TokenizingPool(tokenizer, workers) as encode, \
      tqdm.tqdm(desc=f"tokenising ({tokenizer.kind})", total=_disk_bytes(inputs), unit="B", unit_scale=True,
                disable=not show_progress) as progress:
    if isinstance(tokenizer, HFTokenizer):
      tokenizer.save(writer.staging_dir)
    for chunk, ids_by_split in encode(_chunks(inputs, val_fraction)):
      for split in SPLITS:
        writer.write(split, ids_by_split[split])
      for document, is_val in zip(chunk.documents, chunk.is_val):
        split = "val" if is_val else "train"
        documents[split] += 1
        num_bytes[split] += len(document.data)
      progress.update(chunk.disk_bytes)
      progress.set_postfix(documents=sum(documents.values()), tokens=f"{sum(writer.num_tokens.values()):,}",
                           refresh=False)
    empty = [split for split in SPLITS if not documents[split]]
    if empty:
      raise ValueError(f"{inputs.root}: no document in the {' and '.join(empty)} split "
                       f"({sum(documents.values())} documents, val_fraction={val_fraction}); documents are split "
                       f"by the hash of their path (and line or row)")
    metadata = writer.commit(provenance, tokenizer=tokenizer.spec(), documents=documents, num_bytes=num_bytes)
  tokens = metadata["num_tokens"]
  print(f"{inputs.root} -> {writer.directory}: documents train={documents['train']:,} val={documents['val']:,}, "
        f"UTF-8 bytes train={num_bytes['train']:,} val={num_bytes['val']:,}, tokens train={tokens['train']:,} "
        f"val={tokens['val']:,} ({tokenizer.kind}, vocabulary {tokenizer.vocab_size:,})", flush=True)
  return metadata


@dataclasses.dataclass
class _Chunk:
  documents: list[Document]
  is_val: list[bool]
  disk_bytes: int  # bytes read from disk since the previous chunk was cut


def _chunks(inputs: InputSpec, val_fraction: float) -> Iterator[_Chunk]:
  read = [0]
  chunk, size = _Chunk([], [], 0), 0
  for document in read_documents(inputs, lambda n: read.__setitem__(0, read[0] + n)):
    chunk.documents.append(document)
    chunk.is_val.append(in_validation(document.key, val_fraction))
    size += len(document.data)
    if size >= CHUNK_BYTES:
      chunk.disk_bytes, read[0] = read[0], 0
      yield chunk
      chunk, size = _Chunk([], [], 0), 0
  chunk.disk_bytes = read[0]
  if chunk.documents or chunk.disk_bytes:
    yield chunk


def _disk_bytes(inputs: InputSpec) -> int:
  return sum(os.path.getsize(inputs.path(rel_path)) for rel_path in inputs.rel_paths)


def encode_chunk(tokenizer: Tokenizer, data: list[bytes], is_val: list[bool]) -> dict[str, np.ndarray]:
  """Each split's ids of a chunk of documents, each document followed by the end-of-document id."""
  eod = np.array([tokenizer.eod_id], np.uint32)
  parts = {split: [] for split in SPLITS}
  for ids, val in zip(tokenizer.encode_batch(data), is_val):
    parts["val" if val else "train"] += [ids, eod]
  return {split: np.concatenate(arrays).astype(np.uint32) if arrays else np.zeros(0, np.uint32)
          for split, arrays in parts.items()}


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: Mapping[str, Any], tokenizer_json: str) -> None:
  global _worker_tokenizer
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the pool is the parallelism
  _worker_tokenizer = tokenizer_from_json(spec, tokenizer_json)


def _encode_in_worker(task: tuple[list[bytes], list[bool]]) -> dict[str, np.ndarray]:
  return encode_chunk(_worker_tokenizer, *task)


class _TokenizingPool:
  """Context manager giving `encode(chunks) -> iterator of (chunk, ids by split)`, in chunk order."""

  def __init__(self, tokenizer: Tokenizer, workers: int):
    self.tokenizer, self.workers, self.pool = tokenizer, workers, None

  def __enter__(self):
    if self.workers > 1 and isinstance(self.tokenizer, HFTokenizer):  # bytes: a copy, cheaper than a worker
      self.pool = multiprocessing.get_context("spawn").Pool(
          self.workers, initializer=_init_worker, initargs=(self.tokenizer.spec(), self.tokenizer.tokenizer.to_str()))
    return self.encode

  def encode(self, chunks: Iterator[_Chunk]) -> Iterator[tuple[_Chunk, dict[str, np.ndarray]]]:
    if self.pool is None:
      for chunk in chunks:
        yield chunk, encode_chunk(self.tokenizer, [d.data for d in chunk.documents], chunk.is_val)
      return
    in_flight = collections.deque()
    for chunk in chunks:
      task = ([d.data for d in chunk.documents], chunk.is_val)
      in_flight.append((chunk, self.pool.apply_async(_encode_in_worker, (task,))))
      if len(in_flight) >= CHUNKS_IN_FLIGHT_PER_WORKER * self.workers:
        yield self._oldest(in_flight)
    while in_flight:
      yield self._oldest(in_flight)

  @staticmethod
  def _oldest(in_flight: collections.deque) -> tuple[_Chunk, dict[str, np.ndarray]]:
    chunk, result = in_flight.popleft()
    return chunk, result.get()

  def __exit__(self, *exc_info) -> None:
    if self.pool is not None:
      self.pool.terminate()
      self.pool.join()
