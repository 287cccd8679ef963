"""prepare_data: text, JSON Lines and Parquet inputs, bytes / BPE / a user's tokenizer, errors, kills."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import zstandard
from tokenizers import decoders, models, pre_tokenizers, trainers

from attnres_jax.data import tokenizer as tokenizer_lib
from attnres_jax.data.documents import InputSpec, in_validation, list_files
from attnres_jax.data.prepare import TokenizerChoice, make_tokenizer, prepare_corpus
from attnres_jax.data.token_files import open_token_files, read_metadata

TEXTS = ["plain ascii", "ünïcödé — 日本語 🙂", "a literal <|endoftext|> and </s> stay text",
         "tabs\tand\nnewlines\n", "def f(x):\n  return x ** 2\n", ""]


def make_inputs(root) -> dict[str, str]:
  """Text, gzip/zstd JSON Lines and Parquet inputs under `root`; the documents by key, in reading order."""
  documents = {}
  (root / "notes").mkdir(parents=True)
  for i, text in enumerate(TEXTS):
    (root / "notes" / f"doc{i}.txt").write_text(text * (i + 1), encoding="utf-8")
    documents[f"notes/doc{i}.txt"] = text * (i + 1)
  (root / "notes" / "z.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("compressed text".encode()))
  documents["notes/z.txt.zst"] = "compressed text"
  records = [{"id": i, "text": f"record {i}: {TEXTS[i % len(TEXTS)]}"} for i in range(40)]
  with gzip.open(root / "records.jsonl.gz", "wt", encoding="utf-8") as file:
    for line_number, record in enumerate(records, start=1):
      file.write(json.dumps(record) + "\n")
      documents[f"records.jsonl.gz:{line_number}"] = record["text"]
  rows = [f"row {i} {TEXTS[i % len(TEXTS)][::-1]}" for i in range(30)]
  pq.write_table(pa.table({"text": rows, "n": list(range(30))}), root / "table.parquet", row_group_size=7)
  documents.update({f"table.parquet:{i}": row for i, row in enumerate(rows)})
  return dict(sorted(documents.items(), key=lambda item: item[0].split(":")[0]))  # files in sorted path order


def inputs_of(root, **kwargs) -> InputSpec:
  return InputSpec(str(root), tuple(list_files(str(root), (".txt", ".jsonl", ".parquet"))), **kwargs)


def user_tokenizer_file(path, eod_token="</s>") -> str:
  """A byte-level BPE made here, as a user's own tokenizer.json: another end token, other merges."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(["the quick brown fox"] * 50, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", eod_token], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tokenizer.save(str(path))
  return str(path)


def decoded_documents(directory, split: str) -> list[str]:
  """The documents of a split, cut at the end-of-document ids and decoded with the corpus's tokenizer."""
  metadata = read_metadata(directory)
  tokenizer = tokenizer_lib.tokenizer_from_metadata(metadata, directory, where="test")
  ids = open_token_files(directory, vocab_size=metadata["vocab_size"])._asdict()[split]
  ends = np.flatnonzero(ids == tokenizer.eod_id)
  assert ends.size and ends[-1] == ids.size - 1  # every document ends with the end-of-document id
  return [tokenizer.decode(ids[start:end]) for start, end in zip(np.r_[0, ends[:-1] + 1], ends)]


@pytest.mark.parametrize("name", ["bytes", "bpe", "user"])
def test_round_trip(tmp_path, name):
  documents = make_inputs(tmp_path / "in")
  inputs = inputs_of(tmp_path / "in")
  choice = TokenizerChoice(user_tokenizer_file(tmp_path / "mine.json") if name == "user" else name, vocab_size=400)
  tokenizer = make_tokenizer(choice, inputs, val_fraction=0.2, show_progress=False)
  metadata = prepare_corpus(inputs, str(tmp_path / "out"), tokenizer, val_fraction=0.2, workers=0, provenance={},
                            show_progress=False)
  for split in ("train", "val"):
    expected = [text for key, text in documents.items() if in_validation(key, 0.2) == (split == "val")]
    assert decoded_documents(str(tmp_path / "out"), split) == expected
    assert metadata["documents"][split] == len(expected)
    assert metadata["num_bytes"][split] == sum(len(text.encode("utf-8")) for text in expected)
  spec = metadata["tokenizer"]
  vocab_size = 257 if name == "bytes" else 400 if name == "bpe" else tokenizers.Tokenizer.from_file(
      choice.name).get_vocab_size()
  assert spec["vocab_size"] == metadata["vocab_size"] == vocab_size
  assert spec["eod_token"] == {"bytes": None, "bpe": "<|endoftext|>", "user": "</s>"}[name]
  if name == "bpe":
    assert metadata["num_tokens"]["train"] < metadata["num_bytes"]["train"]  # merges are used
  if name != "bytes":
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")


def test_worker_processes_write_the_same_tokens(tmp_path):
  make_inputs(tmp_path / "in")
  inputs = inputs_of(tmp_path / "in")
  tokenizer = make_tokenizer(TokenizerChoice("bpe", vocab_size=300), inputs, val_fraction=0.2, show_progress=False)
  digests = [prepare_corpus(inputs, str(tmp_path / f"out{workers}"), tokenizer, val_fraction=0.2, workers=workers,
                            provenance={}, show_progress=False)["sha256"] for workers in (0, 2)]
  assert digests[0] == digests[1]


def test_stream_decoder_handles_partial_characters_and_merges(tmp_path):
  make_inputs(tmp_path / "in")
  inputs = inputs_of(tmp_path / "in")
  text = "ünïcödé — 日本語 🙂 the quick brown fox"
  for choice in (TokenizerChoice("bytes"), TokenizerChoice("bpe", vocab_size=300)):
    tokenizer = make_tokenizer(choice, inputs, val_fraction=0.2, show_progress=False)
    ids = tokenizer.encode_batch([text.encode()])[0]
    step = tokenizer.stream_decoder()
    pieces = [step(int(i)) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces  # some ids complete no character by themselves


def run_prepare_data(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "attnres_jax.data.prepare_data", *flags], capture_output=True,
                        text=True, timeout=300)


def test_cli_bpe_on_jsonl_and_parquet(tmp_path):
  documents = make_inputs(tmp_path / "in")
  result = run_prepare_data(f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'out'}", "--tokenizer=bpe",
                            "--vocab_size=350", "--val_fraction=0.2", "--workers=2")
  assert result.returncode == 0, result.stderr
  assert "tokens train=" in result.stdout and "documents=" in result.stderr  # the summary, the progress bar
  decoded = decoded_documents(str(tmp_path / "out"), "train") + decoded_documents(str(tmp_path / "out"), "val")
  assert sorted(decoded) == sorted(documents.values())


def write_bad_input(root, case: str) -> list[str]:
  """An input directory with one mistake; the extra flags it needs."""
  root.mkdir()
  if case == "no_matching_files":
    (root / "a.csv").write_text("x")
  elif case == "jsonl_not_json":
    (root / "a.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
  elif case == "jsonl_no_field":
    (root / "a.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "no text"}\n')
  elif case == "parquet_no_column":
    pq.write_table(pa.table({"body": ["x"]}), root / "a.parquet")
  elif case in ("not_utf8", "not_utf8_replaced"):
    (root / "a.txt").write_text("fine")
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    return ["--errors=replace"] if case == "not_utf8_replaced" else []
  elif case == "bad_tokenizer_file":
    (root / "a.txt").write_text("fine")
    (root.parent / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    return [f"--tokenizer={root.parent / 'tokenizer.json'}"]
  elif case == "missing_tokenizer_file":
    (root / "a.txt").write_text("fine")
    return [f"--tokenizer={root.parent / 'nowhere.json'}"]
  elif case == "no_eod_token":
    (root / "a.txt").write_text("fine")
    return [f"--tokenizer={user_tokenizer_file(root.parent / 't.json', eod_token='<sep>')}"]
  return []


BAD_INPUTS = {
    "missing_input": "no such directory",
    "no_matching_files": "no files ending in",
    "jsonl_not_json": "a.jsonl:2: not a JSON line",
    "jsonl_no_field": "a.jsonl:3: no 'text' field (--text_field); the record has ['body']",
    "parquet_no_column": "a.parquet: no column 'text' (--text_field); its columns are ['body']",
    "not_utf8": "latin1.txt: not UTF-8 text",
    "bad_tokenizer_file": "does not load as an HF tokenizers file",
    "missing_tokenizer_file": "nowhere.json': no such file",
    "no_eod_token": "no end-of-document token among",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_error(tmp_path, case):
  flags = [] if case == "missing_input" else write_bad_input(tmp_path / "in", case)
  result = run_prepare_data(f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'out'}", *flags)
  assert result.returncode == 1 and BAD_INPUTS[case] in result.stderr, result.stderr
  assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists() and not any(name.startswith(".out") for name in os.listdir(tmp_path))


def test_errors_replace_accepts_text_that_is_not_utf8(tmp_path):
  flags = write_bad_input(tmp_path / "in", "not_utf8_replaced")
  result = run_prepare_data(f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'out'}",
                            "--val_fraction=0.5", *flags)
  assert result.returncode == 0, result.stderr
  decoded = decoded_documents(str(tmp_path / "out"), "train") + decoded_documents(str(tmp_path / "out"), "val")
  assert sorted(decoded) == ["caf\ufffd", "fine"]


def test_vocabulary_too_large_for_uint32(tmp_path, monkeypatch):
  path = user_tokenizer_file(tmp_path / "t.json")
  vocab_size = tokenizers.Tokenizer.from_file(path).get_vocab_size()
  monkeypatch.setattr(tokenizer_lib, "MAX_VOCAB_SIZE", vocab_size - 1)  # stands in for a file of 2**32 + 1 ids
  with pytest.raises(ValueError, match=f"{vocab_size} ids do not fit token files"):
    tokenizer_lib.HFTokenizer.from_file(path)


def test_killed_prepare_data_leaves_nothing_a_later_run_reads(tmp_path):
  (tmp_path / "in").mkdir()
  rng = np.random.default_rng(0)
  words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "\n"])
  for i in range(40):
    (tmp_path / "in" / f"{i}.txt").write_text(" ".join(rng.choice(words, 40_000)))
  flags = [f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path / 'out'}", "--tokenizer=bpe",
           "--vocab_size=300", "--workers=0", "--val_fraction=0.2"]
  process = subprocess.Popen([sys.executable, "-m", "attnres_jax.data.prepare_data", *flags],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not any(name.startswith(".out.tmp-") for name in os.listdir(tmp_path)) and time.monotonic() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".out.tmp-")]
  assert leftovers and not (tmp_path / "out").exists()  # killed while writing: only its temporary directory
  with pytest.raises(FileNotFoundError, match="no such directory"):
    open_token_files(str(tmp_path / "out"), vocab_size=300)
  result = run_prepare_data(*flags)
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # the rerun deleted the dead run's directory
  assert open_token_files(str(tmp_path / "out"), vocab_size=300).metadata["documents"]["train"] > 0


@pytest.mark.slow
def test_bench_data_runs():
  result = subprocess.run([sys.executable, "-m", "experiments.bench_data", "--vocab_size=300", "--pipeline_batches=10"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "| bpe |" in result.stdout and "x |" in result.stdout
