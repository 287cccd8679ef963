"""Byte-level corpora from directories of files, and the default one: the Python stdlib.

Tokenisation: each file's bytes are tokens 0..255 (vocab 256), followed by one
`SEPARATOR` token (0, ASCII NUL, which text files do not contain); files are
concatenated in sorted relative-path order. A file belongs to the validation
split when a stable hash of its relative path (sha256, first 8 bytes mod
10000) is below `val_fraction * 10000`, so the split of a file never depends
on which other files are present.

The default corpus is every `*.py` file of the running interpreter's standard
library (`sysconfig.get_paths()["stdlib"]`, without `site-packages` /
`dist-packages`), tokenised once into `<cache_dir>/stdlib-<python version>`
(`cache_dir` defaults to `~/.cache/attnres_jax`) and reused while its metadata
matches this interpreter, stdlib directory, `val_fraction` and builder version.
"""

import hashlib
import os
import pathlib
import platform
import sysconfig
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnres_jax.data.token_files import SPLITS, TokenFileWriter, read_metadata

VOCAB_SIZE = 256
SEPARATOR = 0
BUILDER_VERSION = 2  # bump when the tokenisation or the metadata changes: invalidates cached stdlib corpora
VAL_BUCKETS = 10_000
READ_CHUNK_BYTES = 1 << 24
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages")
DEFAULT_CACHE_DIR = "~/.cache/attnres_jax"


def list_files(root: str, suffixes: Sequence[str], excluded_dirs: Sequence[str] = ()) -> list[str]:
  """Sorted relative POSIX paths of the files under `root` whose names end in one of `suffixes`.

  Skips hidden files and directories (names starting with ".") and directories
  named in `excluded_dirs`, at any depth.
  """
  paths = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [name for name in subdirs if not name.startswith(".") and name not in excluded_dirs]
    relative = os.path.relpath(directory, root)
    paths.extend(pathlib.PurePath(relative, name).as_posix() for name in names
                 if name.endswith(tuple(suffixes)) and not name.startswith("."))
  return sorted(paths)


def in_validation(rel_path: str, val_fraction: float) -> bool:
  """Whether the file at `rel_path` (relative, POSIX) belongs to the validation split."""
  bucket = int.from_bytes(hashlib.sha256(os.fsencode(rel_path)).digest()[:8], "big") % VAL_BUCKETS
  return bucket < round(val_fraction * VAL_BUCKETS)


def _append_file(writer: TokenFileWriter, split: str, path: str) -> int | None:
  """Writes one file's bytes and a separator to `split`; its size, or None if it cannot be opened."""
  try:
    file = open(path, "rb")
  except OSError:
    return None
  size = 0
  with file:
    while chunk := file.read(READ_CHUNK_BYTES):
      writer.write(split, np.frombuffer(chunk, np.uint8))
      size += len(chunk)
  writer.write(split, np.array([SEPARATOR], np.uint8))
  return size


def build_byte_corpus(root: str, rel_paths: Sequence[str], output_dir: str, *, val_fraction: float,
                      provenance: Mapping[str, Any]) -> dict[str, Any]:
  """Tokenises the files `rel_paths` under `root` into a token-files directory; returns its metadata.

  Files that cannot be opened are skipped (counted in the metadata). Raises
  ValueError, leaving `output_dir` untouched, when a split gets no file.
  Prints the corpus statistics.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
  paths_by_split = {split: [] for split in SPLITS}
  for rel_path in rel_paths:
    paths_by_split["val" if in_validation(rel_path, val_fraction) else "train"].append(rel_path)
  files, num_bytes, skipped = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), 0
  with TokenFileWriter(output_dir, vocab_size=VOCAB_SIZE) as writer:
    for split, paths in paths_by_split.items():
      for rel_path in paths:
        size = _append_file(writer, split, os.path.join(root, rel_path))
        if size is None:
          skipped += 1
        else:
          files[split] += 1
          num_bytes[split] += size
    empty = [split for split in SPLITS if not files[split]]
    if empty:
      raise ValueError(f"{root}: no file in the {' and '.join(empty)} split ({sum(files.values())} readable "
                       f"files, val_fraction={val_fraction}); files are split whole, by path hash")
    metadata = writer.commit({**provenance, "tokenizer": "bytes", "separator": SEPARATOR, "source_dir": root,
                              "val_fraction": val_fraction, "files": files, "bytes": num_bytes,
                              "skipped_files": skipped})
  digests = metadata["sha256"]
  print(f"Byte corpus {root} -> {writer.directory}: files train={files['train']} val={files['val']} "
        f"(skipped {skipped}), bytes train={num_bytes['train']:,} val={num_bytes['val']:,}, "
        f"sha256 train={digests['train'][:16]} val={digests['val'][:16]}", flush=True)
  return metadata


def stdlib_dir() -> str:
  """The standard-library directory of the running interpreter."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_token_files(cache_dir: str, val_fraction: float) -> str:
  """The token-files directory of the stdlib corpus under `cache_dir` ("" = default), built if needed."""
  root = stdlib_dir()
  identity = {"corpus": "stdlib", "python": f"{platform.python_implementation()} {platform.python_version()}",
              "source_dir": root, "val_fraction": val_fraction, "builder_version": BUILDER_VERSION}
  directory = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR),
                           f"stdlib-{platform.python_version()}")
  cached = (read_metadata(directory) or {}).get("provenance", {})
  if any(cached.get(key) != value for key, value in identity.items()):
    build_byte_corpus(root, list_files(root, (".py",), STDLIB_EXCLUDED_DIRS), directory,
                      val_fraction=val_fraction, provenance=identity)
  return directory
