"""Turns a directory of text files into a byte-level token-files directory (vocab 256, uint16).

  python -m attnres_jax.data.prepare_data --input_dir=DIR --output_dir=DIR \
      [--val_fraction=0.02] [--extensions=.txt,.md,.py]

Tokenisation and the per-file, path-hash split are those of the stdlib corpus
(`corpus.py`); hidden files and directories are skipped. Train on the result
with `config.data.source=token_files`, `config.data.path=<output_dir>`.
"""

import os

from absl import app, flags

from attnres_jax import cli
from attnres_jax.data.corpus import build_byte_corpus, list_files

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Directory searched recursively for text files.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Token-files directory to create (or replace).", required=True)
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.02, "Share of files (by path hash) in the validation split.")
_EXTENSIONS = flags.DEFINE_list("extensions", [".txt", ".md", ".py"], "File name suffixes to include.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = os.path.abspath(os.path.expanduser(_INPUT_DIR.value))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--input_dir={_INPUT_DIR.value!r}: no such directory")
  rel_paths = list_files(root, _EXTENSIONS.value)
  if not rel_paths:
    raise ValueError(f"--input_dir={_INPUT_DIR.value!r}: no files ending in {_EXTENSIONS.value}")
  build_byte_corpus(root, rel_paths, _OUTPUT_DIR.value, val_fraction=_VAL_FRACTION.value,
                    provenance={"corpus": "prepare_data", "extensions": _EXTENSIONS.value})


if __name__ == "__main__":
  cli.run(main)
