"""`config.data` -> the token splits of the run: the stdlib corpus or a token-files directory."""

import ml_collections

from attnres_jax.data import corpus
from attnres_jax.data.token_files import TokenSplits, open_token_files

SOURCES = ("stdlib", "token_files")

def load_splits(data_config: ml_collections.ConfigDict, vocab_size: int) -> TokenSplits:
  """Memory-maps the train and validation tokens chosen by `data_config`, checked for `vocab_size`.

  `source="stdlib"` tokenises the interpreter's standard library (bytes, or
  `tokenizer="bpe"`: a BPE of `bpe_vocab_size` ids) into
  `data_config.cache_dir` on first use; `source="token_files"` opens the
  directory `data_config.path` (format: `attnres_jax/data/token_files.py`).
  """
  if data_config.source == "stdlib":
    directory = corpus.stdlib_token_files(data_config.cache_dir, data_config.val_fraction,
                                          tokenizer=data_config.tokenizer, bpe_vocab_size=data_config.bpe_vocab_size)
    return open_token_files(directory, vocab_size=vocab_size, field="config.data.cache_dir")
  if data_config.source == "token_files":
    if not data_config.path:
      raise ValueError("config.data.path='': set it to a token-files directory (source=token_files)")
    return open_token_files(data_config.path, vocab_size=vocab_size, field="config.data.path")
  raise ValueError(f"config.data.source={data_config.source!r}: must be one of {SOURCES}")
