"""The default corpus: the Python standard library's source files, as bytes or BPE tokens (docs/method.md §14).

Every `*.py` file of the running interpreter's standard library
(`sysconfig.get_paths()["stdlib"]`, without `site-packages` / `dist-packages`)
is one document; a file belongs to the validation split when a stable hash of
its relative path is below `val_fraction` (`documents.in_validation`).

- `tokenizer="bytes"` (the default): each file's bytes as they are (a few test
  files are Latin-1 on purpose), then the end-of-document id 0 (ASCII NUL,
  which source files do not contain); vocabulary 256.
- `tokenizer="bpe"`: a byte-level BPE of `bpe_vocab_size` ids trained on the
  train split (bytes that are not UTF-8 replaced by U+FFFD), its own
  end-of-document token.

Each is built once into `<cache_dir>/stdlib-<python version>[-bpe<vocab>]`
(`cache_dir` defaults to `~/.cache/attnres_jax`) and reused while its
metadata matches this interpreter, stdlib directory, `val_fraction`, tokenizer
and builder version.
"""

import os
import platform
import sysconfig

from attnres_jax.data.documents import InputSpec, list_files
from attnres_jax.data.prepare import TokenizerChoice, make_tokenizer, prepare_corpus
from attnres_jax.data.token_files import read_metadata
from attnres_jax.data.tokenizer import ByteTokenizer

TOKENIZERS = ("bytes", "bpe")
BYTES_EOD_ID = 0
BUILDER_VERSION = 3  # bump when the tokenisation or the metadata changes: invalidates cached stdlib corpora
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages")
DEFAULT_CACHE_DIR = "~/.cache/attnres_jax"


def stdlib_dir() -> str:
  """The standard-library directory of the running interpreter."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_token_files(cache_dir: str, val_fraction: float, *, tokenizer: str = "bytes",
                       bpe_vocab_size: int = 4096) -> str:
  """The token-files directory of the stdlib corpus under `cache_dir` ("" = default), built if needed."""
  if tokenizer not in TOKENIZERS:
    raise ValueError(f"config.data.tokenizer={tokenizer!r}: must be one of {TOKENIZERS}")
  root = stdlib_dir()
  tokenizer_name = "bytes" if tokenizer == "bytes" else f"bpe{bpe_vocab_size}"
  identity = {"corpus": "stdlib", "python": f"{platform.python_implementation()} {platform.python_version()}",
              "source_dir": root, "val_fraction": val_fraction, "builder_version": BUILDER_VERSION,
              "tokenizer": tokenizer_name}
  suffix = "" if tokenizer == "bytes" else f"-{tokenizer_name}"
  directory = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR),
                           f"stdlib-{platform.python_version()}{suffix}")
  cached = (read_metadata(directory) or {}).get("provenance", {})
  if any(cached.get(key) != value for key, value in identity.items()):
    rel_paths = tuple(list_files(root, (".py",), STDLIB_EXCLUDED_DIRS))
    if tokenizer == "bytes":
      inputs = InputSpec(root, rel_paths, errors="keep")
      chosen = ByteTokenizer(vocab_size=256, eod_id=BYTES_EOD_ID)
    else:
      inputs = InputSpec(root, rel_paths, errors="replace")
      chosen = make_tokenizer(TokenizerChoice("bpe", vocab_size=bpe_vocab_size, bpe_train_bytes=0), inputs,
                              val_fraction=val_fraction, show_progress=False)
    prepare_corpus(inputs, directory, chosen, val_fraction=val_fraction, workers=os.cpu_count() or 1,
                   provenance=identity, show_progress=False)
  return directory
