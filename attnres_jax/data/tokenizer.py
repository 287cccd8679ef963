"""Tokenizers of token-files corpora (docs/method.md §14): bytes, or a Hugging Face `tokenizers` file.

- `ByteTokenizer`: ids 0..255 are the bytes of the UTF-8 text, and the end of a
  document is one more id: 256 in the corpora of `prepare_data` (vocabulary
  257), the NUL byte 0 in the stdlib corpus (vocabulary 256, whose numbers
  predate the reserved id; source files hold no NUL).
- `HFTokenizer`: any `tokenizer.json` of HF `tokenizers`, the user's or one that
  `train_bpe` trains here (byte-level BPE: every string round-trips exactly). Its
  end-of-document token is a special token of the file. Text is encoded without
  the file's own added tokens (no BOS: documents are separated by the
  end-of-document token alone), and special-token strings inside a document
  are encoded as plain text, so a document cannot end itself early.

Every tokenizer encodes a batch of documents given as UTF-8 `bytes` to arrays
of ids (the end-of-document id not included), decodes ids to text, and decodes
a stream of ids incrementally (`stream_decoder`: text appears as soon as its
bytes or merges are complete). `spec()` is the record kept in a corpus's
`metadata.json`; `tokenizer_from_metadata` rebuilds the tokenizer from it.
This module imports neither jax nor the rest of the project: worker
processes of `prepare_data` import it alone.
"""

import codecs
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from attnres_jax.files import write_json_atomically

TOKENIZER_FILE = "tokenizer.json"  # an HF tokenizer's file inside a token-files directory
BYTE_VOCAB_SIZE = 257  # prepare_data's byte corpora: the 256 bytes and the end-of-document id
BYTE_EOD_ID = 256
DEFAULT_EOD_TOKEN = "<|endoftext|>"  # the end-of-document token of BPE tokenizers trained here
# End-of-document tokens looked for, in this order, in a user's tokenizer file without --eod_token.
EOD_CANDIDATES = (DEFAULT_EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>")
MAX_VOCAB_SIZE = 2**32  # token files hold uint32 ids at most


class Tokenizer(Protocol):
  vocab_size: int
  eod_id: int

  def encode_batch(self, documents: list[bytes]) -> list[np.ndarray]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def stream_decoder(self) -> Callable[[int], str]: ...

  def spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
  """UTF-8 bytes as ids, and a reserved end-of-document id (256, or 0 in the stdlib corpus)."""

  kind = "bytes"

  def __init__(self, *, vocab_size: int = BYTE_VOCAB_SIZE, eod_id: int = BYTE_EOD_ID):
    if vocab_size not in (256, 257) or not 0 <= eod_id < vocab_size:
      raise ValueError(f"a byte tokenizer has vocab_size 256 or 257 and an end-of-document id below it, got "
                       f"vocab_size={vocab_size}, eod_id={eod_id}")
    self.vocab_size, self.eod_id = vocab_size, eod_id

  def encode_batch(self, documents: list[bytes]) -> list[np.ndarray]:
    return [np.frombuffer(document, np.uint8) for document in documents]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in ids if i < 256 and i != self.eod_id).decode("utf-8", errors="replace")

  def stream_decoder(self) -> Callable[[int], str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda i: decoder.decode(bytes([i])) if i < 256 and i != self.eod_id else ""

  def spec(self) -> dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id, "eod_token": None,
            "file": None}


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` and its end-of-document token."""

  kind = "huggingface"

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eod_token: str = "", where: str = "the tokenizer"):
    self.tokenizer = tokenizer
    tokenizer.encode_special_tokens = True  # not saved in the file: set at every load
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    if self.vocab_size > MAX_VOCAB_SIZE:
      raise ValueError(f"{where}: {self.vocab_size} ids do not fit token files (uint32, at most 2**32 ids)")
    if eod_token and eod_token not in vocab:
      raise ValueError(f"{where}: no token {eod_token!r} (--eod_token) in its vocabulary")
    found = eod_token or next((token for token in EOD_CANDIDATES if token in vocab), "")
    if not found:
      special = sorted(token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special)
      raise ValueError(f"{where}: no end-of-document token among {EOD_CANDIDATES}; name one of its special "
                       f"tokens {special} with --eod_token")
    self.eod_token, self.eod_id = found, vocab[found]

  @classmethod
  def from_file(cls, path: str, *, eod_token: str = "") -> "HFTokenizer":
    """Loads a `tokenizer.json`; one clear error if it does not exist or does not load."""
    where = f"tokenizer file {path!r}"
    if path.endswith(".model"):
      raise ValueError(f"{where}: SentencePiece .model files are not read here; convert it to a tokenizer.json "
                       f"(HF tokenizers) first")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: no such file")
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
      raise ValueError(f"{where} does not load as an HF tokenizers file: {error}") from error
    return cls(tokenizer, eod_token=eod_token, where=where)

  def encode_batch(self, documents: list[bytes]) -> list[np.ndarray]:
    encodings = self.tokenizer.encode_batch_fast([document.decode("utf-8") for document in documents],
                                                 add_special_tokens=False)
    return [np.asarray(encoding.ids, np.uint32) for encoding in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids if i != self.eod_id], skip_special_tokens=False)

  def stream_decoder(self) -> Callable[[int], str]:
    stream = decoders.DecodeStream(skip_special_tokens=False)
    return lambda i: "" if i == self.eod_id else (stream.step(self.tokenizer, int(i)) or "")

  def spec(self) -> dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id, "eod_token": self.eod_token,
            "file": TOKENIZER_FILE}

  def save(self, directory: str) -> None:
    self.tokenizer.save(os.path.join(directory, TOKENIZER_FILE))


def check_bpe_vocab_size(vocab_size: int) -> None:
  if not 257 < vocab_size <= MAX_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs more than 257 ids (256 byte symbols, the "
                     f"end-of-document token and at least one merge) and at most 2**32")


def train_bpe(texts: Iterable[str], *, vocab_size: int, show_progress: bool = True) -> HFTokenizer:
  """A byte-level BPE tokenizer of `vocab_size` ids (the 256 byte symbols, `DEFAULT_EOD_TOKEN`, merges)."""
  check_bpe_vocab_size(vocab_size)
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DEFAULT_EOD_TOKEN], show_progress=show_progress,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return HFTokenizer(tokenizer, eod_token=DEFAULT_EOD_TOKEN, where="the trained BPE tokenizer")


def tokenizer_from_json(spec: Mapping[str, Any], tokenizer_json: str | None) -> Tokenizer:
  """The tokenizer of a `spec()` record; `tokenizer_json` is the HF file's text (None for bytes)."""
  if spec["kind"] == ByteTokenizer.kind:
    return ByteTokenizer(vocab_size=spec["vocab_size"], eod_id=spec["eod_id"])
  return HFTokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), eod_token=spec["eod_token"])


def tokenizer_from_metadata(metadata: Mapping[str, Any], directory: str, *, where: str) -> Tokenizer | None:
  """The tokenizer a token-files directory was written with, or None if its metadata does not say.

  Byte corpora written before end-of-document ids were reserved record
  `"tokenizer": "bytes"` and a `separator` in their provenance: that separator
  is their end of document.
  """
  spec = metadata.get("tokenizer")
  provenance = metadata.get("provenance")
  if spec is None and isinstance(provenance, dict) and provenance.get("tokenizer") == "bytes":
    return ByteTokenizer(vocab_size=256, eod_id=provenance.get("separator", 0))
  if not isinstance(spec, dict):
    return None
  if spec.get("kind") == ByteTokenizer.kind:
    return tokenizer_from_json(spec, None)
  if spec.get("kind") != HFTokenizer.kind or not isinstance(spec.get("file"), str):
    raise ValueError(f"{where}: metadata.json tokenizer={json.dumps(spec)} is neither a bytes nor a "
                     f"huggingface record (attnres_jax/data/tokenizer.py)")
  tokenizer = HFTokenizer.from_file(os.path.join(directory, spec["file"]), eod_token=spec.get("eod_token") or "")
  if tokenizer.eod_id != spec.get("eod_id"):
    raise ValueError(f"{where}: its {spec['file']} gives {tokenizer.eod_token!r} the id {tokenizer.eod_id}, "
                     f"metadata.json says {spec.get('eod_id')}")
  return tokenizer


WORKDIR_TOKENIZER = "tokenizer"  # <workdir>/tokenizer/: the run's tokenizer, for sample


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> None:
  """Writes `spec.json` (and an HF tokenizer's `tokenizer.json`) into `directory`, each atomically."""
  os.makedirs(directory, exist_ok=True)
  if isinstance(tokenizer, HFTokenizer):
    temporary = os.path.join(directory, f".{TOKENIZER_FILE}.tmp-{os.getpid()}")
    tokenizer.tokenizer.save(temporary)
    os.replace(temporary, os.path.join(directory, TOKENIZER_FILE))
  write_json_atomically(os.path.join(directory, "spec.json"), {"tokenizer": tokenizer.spec()})


def load_saved_tokenizer(directory: str) -> Tokenizer | None:
  """The tokenizer `save_tokenizer` wrote into `directory`, or None if there is none."""
  try:
    with open(os.path.join(directory, "spec.json"), encoding="utf-8") as file:
      record = json.load(file)
  except FileNotFoundError:
    return None
  return tokenizer_from_metadata(record, directory, where=directory)
