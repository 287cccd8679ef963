"""The documents of an input directory (docs/method.md §14): text files, JSON Lines records, Parquet rows.

A file's format is its name without a compression suffix (`.gz`: gzip,
`.zst`: zstandard, decompressed as a stream): `*.jsonl` / `*.ndjson` hold one
document per line (a JSON object whose `text_field` is a string), `*.parquet`
one per row (a string column `text_field`, read in record batches with
pyarrow), and any other file is one document. Files are read in sorted
relative-path order, hidden files and directories skipped.

Each `Document` carries its UTF-8 bytes and a key naming it (`path`,
`path:line` or `path:row`): the key's hash chooses its split, so the split of
a document never depends on which others are present. `errors` says what
becomes of text that is not UTF-8: `strict` stops with the file (and line),
`replace` substitutes U+FFFD, `keep` passes the bytes as they are (only the
byte tokenizer takes them).

`check_inputs` runs the checks that need no pass over the data (files, formats,
codecs, Parquet schemas) before any work; `read_documents` finds the rest
(a line that is not JSON, a record without the field, bytes that are not
UTF-8) as it reads, naming the file and line.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import pyarrow.parquet as pq
import pyarrow.types as pa_types
import zstandard

ERRORS = ("strict", "replace", "keep")
COMPRESSIONS = (".gz", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"
VAL_BUCKETS = 10_000
READ_BUFFER_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Document:
  key: str  # "path", "path:line" (1-based) or "path:row" (0-based), relative to the input directory
  data: bytes  # the text, UTF-8


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """Where the documents are and how to read them."""

  root: str  # the input directory
  rel_paths: tuple[str, ...]  # its files, relative POSIX paths, sorted
  text_field: str = "text"  # the JSON field / Parquet column of each record's text
  errors: str = "strict"  # strict | replace | keep (see the module docstring)

  def path(self, rel_path: str) -> str:
    return os.path.join(self.root, rel_path)


def list_files(root: str, suffixes: Sequence[str], excluded_dirs: Sequence[str] = ()) -> list[str]:
  """Sorted relative POSIX paths of the files under `root` whose names end in one of `suffixes`
  (or in one of them and a compression suffix). Skips hidden files and directories (names starting
  with ".") and directories named in `excluded_dirs`, at any depth."""
  paths = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [name for name in subdirs if not name.startswith(".") and name not in excluded_dirs]
    relative = os.path.relpath(directory, root)
    paths.extend(pathlib.PurePath(relative, name).as_posix() for name in names
                 if _uncompressed_name(name).endswith(tuple(suffixes)) and not name.startswith("."))
  return sorted(paths)


def in_validation(key: str, val_fraction: float) -> bool:
  """Whether the document (or file) named `key` belongs to the validation split (sha256 of the key)."""
  bucket = int.from_bytes(hashlib.sha256(os.fsencode(key)).digest()[:8], "big") % VAL_BUCKETS
  return bucket < round(val_fraction * VAL_BUCKETS)


def _uncompressed_name(name: str) -> str:
  return name.removesuffix(".gz").removesuffix(".zst")


def file_format(rel_path: str) -> str:
  """`jsonl`, `parquet` or `text`, by the name without its compression suffix."""
  name = _uncompressed_name(rel_path)
  return "jsonl" if name.endswith(JSONL_SUFFIXES) else "parquet" if name.endswith(PARQUET_SUFFIX) else "text"


def check_inputs(spec: InputSpec) -> None:
  """One clear error for what can be checked without reading the documents: the errors mode, that
  each file opens, and each Parquet file's `text_field` column."""
  if spec.errors not in ERRORS:
    raise ValueError(f"--errors={spec.errors!r}: must be one of {ERRORS}")
  if not spec.rel_paths:
    raise ValueError(f"{spec.root}: no input files")
  for rel_path in spec.rel_paths:
    path = spec.path(rel_path)
    if not os.access(path, os.R_OK):
      raise PermissionError(f"{path}: not readable")
    if file_format(rel_path) == "parquet":
      with _InputFile(path) as file:
        schema = _parquet_file(file, path).schema_arrow
      if spec.text_field not in schema.names:
        raise ValueError(f"{path}: no column {spec.text_field!r} (--text_field); its columns are {schema.names}")
      column_type = schema.field(spec.text_field).type
      if not (pa_types.is_string(column_type) or pa_types.is_large_string(column_type)):
        raise ValueError(f"{path}: column {spec.text_field!r} is {column_type}, not a string column")


def read_documents(spec: InputSpec, on_disk_bytes: Callable[[int], None] = lambda _: None) -> Iterator[Document]:
  """The documents of every input file, in order; `on_disk_bytes(n)` is told of each `n` bytes read
  from disk (compressed bytes for compressed files), for progress bars."""
  reader = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}
  for rel_path in spec.rel_paths:
    with _InputFile(spec.path(rel_path)) as file:
      position = 0
      for document in reader[file_format(rel_path)](file, rel_path, spec):
        on_disk_bytes(file.raw_position() - position)
        position = file.raw_position()
        yield document
      on_disk_bytes(os.path.getsize(spec.path(rel_path)) - position)


class _InputFile:
  """A file opened for reading, decompressed by its suffix; `raw_position` is the offset read on disk."""

  def __init__(self, path: str):
    self.path = path
    self._raw = open(path, "rb")
    self.compressed = path.endswith(COMPRESSIONS)
    if path.endswith(".gz"):
      self.stream: BinaryIO = gzip.GzipFile(fileobj=self._raw)
    elif path.endswith(".zst"):
      reader = zstandard.ZstdDecompressor().stream_reader(self._raw, read_across_frames=True, closefd=False)
      self.stream = io.BufferedReader(reader, READ_BUFFER_BYTES)
    else:
      self.stream = self._raw

  def raw_position(self) -> int:
    return self._raw.tell()

  def __enter__(self) -> "_InputFile":
    return self

  def __exit__(self, *exc_info) -> None:
    self.stream.close()
    self._raw.close()


def _utf8(data: bytes, errors: str, where: str) -> bytes:
  """`data` checked as UTF-8 under `errors` (replace: invalid bytes become U+FFFD)."""
  if errors == "keep":
    return data
  try:
    data.decode("utf-8")
    return data
  except UnicodeDecodeError as error:
    if errors == "replace":
      return data.decode("utf-8", errors="replace").encode("utf-8")
    raise ValueError(f"{where}: not UTF-8 text (byte {error.start}: {error.reason}); --errors=replace "
                     f"substitutes U+FFFD for such bytes") from error


def _text_documents(file: _InputFile, rel_path: str, spec: InputSpec) -> Iterator[Document]:
  yield Document(rel_path, _utf8(file.stream.read(), spec.errors, file.path))


def _jsonl_documents(file: _InputFile, rel_path: str, spec: InputSpec) -> Iterator[Document]:
  field = spec.text_field
  for line_number, line in enumerate(file.stream, start=1):
    where = f"{file.path}:{line_number}"
    if not line.strip():
      continue
    if spec.errors == "replace":
      line = _utf8(line, "replace", where)
    try:
      record = json.loads(line)
    except UnicodeDecodeError as error:
      raise ValueError(f"{where}: not UTF-8 text ({error.reason}); --errors=replace substitutes U+FFFD for "
                       f"such bytes") from error
    except json.JSONDecodeError as error:
      raise ValueError(f"{where}: not a JSON line ({error.msg}, column {error.colno})") from error
    if not isinstance(record, dict) or field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"{where}: no {field!r} field (--text_field); the record has {keys}")
    if not isinstance(record[field], str):
      raise ValueError(f"{where}: field {field!r} is a {type(record[field]).__name__}, not a string")
    yield Document(f"{rel_path}:{line_number}", _encode(record[field], spec.errors, where))


def _encode(text: str, errors: str, where: str) -> bytes:
  """UTF-8 of a decoded string, which JSON's `\\ud800` escapes can leave with lone surrogates."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError as error:
    if errors != "strict":
      return text.encode("utf-8", errors="replace")
    raise ValueError(f"{where}: the text holds a lone surrogate ({error.reason}), which is not UTF-8; "
                     f"--errors=replace substitutes '?' for it") from error


def _parquet_file(file: _InputFile, path: str) -> pq.ParquetFile:
  """The Parquet file (a compressed one is decompressed in memory: Parquet needs to seek)."""
  source = io.BytesIO(file.stream.read()) if file.compressed else file.stream
  try:
    return pq.ParquetFile(source)
  except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) and others for a bad file
    raise ValueError(f"{path}: not a Parquet file ({error})") from error


def _parquet_documents(file: _InputFile, rel_path: str, spec: InputSpec) -> Iterator[Document]:
  row = 0
  for batch in _parquet_file(file, file.path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[spec.text_field]):
    for text in batch.column(0).to_pylist():
      where = f"{file.path}: row {row}"
      if text is None:
        raise ValueError(f"{where}: column {spec.text_field!r} is null")
      yield Document(f"{rel_path}:{row}", _encode(text, spec.errors, where))
      row += 1
