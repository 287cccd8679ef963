"""Training and sampling on prepared corpora: the data's vocabulary, bits per byte, a BPE run that samples."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from attnres_jax.data.documents import InputSpec, in_validation, list_files
from attnres_jax.data.prepare import TokenizerChoice, make_tokenizer, prepare_corpus
from attnres_jax.data.tokenizer import WORKDIR_TOKENIZER, load_saved_tokenizer
from attnres_jax.generate import Generator, Sampling
from attnres_jax.sample import load_model, load_run_config
from attnres_jax.train.loop import bits_per_byte, train_and_evaluate
from configs import smoke

TEXT = "def square(x):\n  return x * x\n\nclass Point:\n  def __init__(self, x, y):\n    self.x, self.y = x, y\n"


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory) -> tuple[str, list[str]]:
  """A BPE token-files directory of 60 small documents; the directory and the documents."""
  root = tmp_path_factory.mktemp("texts")
  documents = [f"# file {i} é\n{TEXT * (1 + i % 3)}" for i in range(60)]
  for i, text in enumerate(documents):
    (root / f"{i:02d}.py").write_text(text, encoding="utf-8")
  inputs = InputSpec(str(root), tuple(list_files(str(root), (".py",))))
  tokenizer = make_tokenizer(TokenizerChoice("bpe", vocab_size=300), inputs, val_fraction=0.2, show_progress=False)
  out = str(tmp_path_factory.mktemp("corpus") / "bpe")
  prepare_corpus(inputs, out, tokenizer, val_fraction=0.2, workers=0, provenance={}, show_progress=False)
  return out, documents


def corpus_config(path: str, **model):
  config = smoke.get_config()
  config.data.update(source="token_files", path=path)
  config.model.update({"vocab_size": 0, **model})
  config.train.update(num_steps=8, eval_every=4, checkpoint_every=8, dynamics_every=0)
  return config


def test_bits_per_byte_by_hand():
  metadata = {"num_tokens": {"train": 10, "val": 300}, "num_bytes": {"train": 40, "val": 1200}}
  assert bits_per_byte(math.log(2), metadata) == pytest.approx(0.25)  # 1 bit per token, 4 bytes per token
  assert bits_per_byte(2.0, {**metadata, "num_bytes": None}) is None  # token files that do not record bytes


def test_run_takes_the_vocabulary_and_reports_bits_per_byte(tmp_path, bpe_corpus):
  path, documents = bpe_corpus
  final = train_and_evaluate(corpus_config(path), str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["vocab_size"] == 300  # taken from metadata.json
  val_tokens = os.path.getsize(os.path.join(path, "val.bin")) // 2  # uint16 ids
  val_bytes = sum(len(text.encode()) for i, text in enumerate(documents) if in_validation(f"{i:02d}.py", 0.2))
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evals = [r for r in records if r["split"] == "eval"]
  assert len(evals) == 2
  for record in evals:
    assert record["bits_per_byte"] == pytest.approx(record["loss"] * val_tokens / val_bytes / math.log(2), rel=1e-6)
  assert final["eval_bits_per_byte"] == pytest.approx(evals[-1]["bits_per_byte"])
  assert load_saved_tokenizer(str(tmp_path / "run" / WORKDIR_TOKENIZER)).vocab_size == 300


def test_a_model_vocabulary_below_the_data_is_one_clear_error(tmp_path, bpe_corpus):
  with pytest.raises(ValueError, match="vocab_size=300 exceeds config.model.vocab_size=256; set it to 300, or to 0"):
    train_and_evaluate(corpus_config(bpe_corpus[0], vocab_size=256), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_bpe_smoke_run_samples_decodable_text(tmp_path, bpe_corpus):
  workdir = str(tmp_path / "run")
  train_and_evaluate(corpus_config(bpe_corpus[0], vocab_size=384, residual="full"), workdir)  # 84 padding ids
  config = load_run_config(workdir)
  tokenizer = load_saved_tokenizer(os.path.join(workdir, WORKDIR_TOKENIZER))
  model, _ = load_model(workdir, config)
  prompt = np.asarray(tokenizer.encode_batch(["def ".encode()])[0], np.int32)[None]
  ids = [int(t[0]) for t in Generator(model, 32, Sampling(1.0, num_ids=300)).generate(prompt, 40, seed=0)]
  assert max(ids) < 300  # never a padding id
  step = tokenizer.stream_decoder()
  streamed = "".join(step(i) for i in ids if i != tokenizer.eod_id)
  assert streamed == tokenizer.decode(ids)  # the stream is the text, merges and partial characters included
  result = subprocess.run([sys.executable, "-m", "attnres_jax.sample", f"--workdir={workdir}", "--prompt=def ",
                           "--max_new_tokens=30", "--temperature=0"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("def ") and len(result.stdout) > len("def \n")
