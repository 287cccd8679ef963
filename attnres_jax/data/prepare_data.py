"""Turns a directory of text, JSON Lines or Parquet files into a token-files directory (docs/method.md §14).

  python -m attnres_jax.data.prepare_data --input_dir=DIR --output_dir=DIR \
      [--tokenizer=bytes|bpe|path/to/tokenizer.json] [--vocab_size=16384] [--text_field=text] \
      [--extensions=.txt,.md,.py,.jsonl,.parquet] [--val_fraction=0.02] [--errors=strict|replace|keep] \
      [--workers=N]

One document per text file, JSON line or Parquet row (`documents.py`; `.gz`
and `.zst` files are decompressed); each ends with the tokenizer's
end-of-document id; the split is chosen per document by the hash of its path
(and line or row). `--tokenizer=bpe` trains a byte-level BPE on the train
split and saves it as `tokenizer.json` beside the token files. Inputs are
checked before any work; a bad record stops the run with its file and line.
The output appears only when complete: a killed run leaves a hidden temporary
directory beside it, which no reader opens and the next run deletes; rerun to
start again. Train on the result with `config.data.source=token_files`,
`config.data.path=<output_dir>`.
"""

import os

from absl import app, flags

from attnres_jax import cli
from attnres_jax.data.documents import ERRORS, InputSpec, check_inputs, list_files
from attnres_jax.data.prepare import TokenizerChoice, make_tokenizer, prepare_corpus
from attnres_jax.data.token_files import check_replaceable

_INPUT_DIR = flags.DEFINE_string("input_dir", None, "Directory searched recursively for input files.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Token-files directory to create (or replace).", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes (vocabulary 257), bpe (trained on the input) or the "
                                 "path of an HF tokenizers tokenizer.json.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", TokenizerChoice.vocab_size, "--tokenizer=bpe: ids to train.")
_BPE_TRAIN_BYTES = flags.DEFINE_integer("bpe_train_bytes", TokenizerChoice.bpe_train_bytes,
                                        "--tokenizer=bpe: UTF-8 bytes of train documents it learns from; 0 = all.")
_EOD_TOKEN = flags.DEFINE_string("eod_token", "", "A tokenizer file's end-of-document token; default: the first "
                                 "of <|endoftext|>, </s>, <eos>, <|end_of_text|> it has.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The text's field of JSON Lines records / Parquet column.")
_EXTENSIONS = flags.DEFINE_list("extensions", [".txt", ".md", ".py", ".jsonl", ".parquet"],
                                "File name suffixes to include (each also with .gz or .zst after it).")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.02, "Share of documents (by hash) in the validation split.")
_ERRORS = flags.DEFINE_enum("errors", "strict", ERRORS, "Text that is not UTF-8: strict stops, replace substitutes "
                            "U+FFFD, keep passes the bytes (--tokenizer=bytes only).")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizer processes (0 or 1: this process).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = os.path.abspath(os.path.expanduser(_INPUT_DIR.value))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--input_dir={_INPUT_DIR.value!r}: no such directory")
  rel_paths = tuple(list_files(root, _EXTENSIONS.value))
  if not rel_paths:
    raise ValueError(f"--input_dir={_INPUT_DIR.value!r}: no files ending in {_EXTENSIONS.value} "
                     f"(optionally .gz or .zst after them)")
  inputs = InputSpec(root, rel_paths, text_field=_TEXT_FIELD.value, errors=_ERRORS.value)
  check_inputs(inputs)
  check_replaceable(_OUTPUT_DIR.value)
  choice = TokenizerChoice(_TOKENIZER.value, vocab_size=_VOCAB_SIZE.value, bpe_train_bytes=_BPE_TRAIN_BYTES.value,
                           eod_token=_EOD_TOKEN.value)
  tokenizer = make_tokenizer(choice, inputs, val_fraction=_VAL_FRACTION.value)
  prepare_corpus(inputs, _OUTPUT_DIR.value, tokenizer, val_fraction=_VAL_FRACTION.value, workers=_WORKERS.value,
                 provenance={"corpus": "prepare_data", "input_dir": root, "extensions": _EXTENSIONS.value,
                             "text_field": _TEXT_FIELD.value, "errors": _ERRORS.value,
                             "val_fraction": _VAL_FRACTION.value})


if __name__ == "__main__":
  cli.run(main)
