"""Data package: byte corpora, the token-files format, config errors and the grain pipelines."""

import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from attnres_jax.data import corpus, eval_batches, load_splits, token_files, train_iterator
from attnres_jax.data.documents import InputSpec, in_validation, list_files
from attnres_jax.data.prepare import prepare_corpus
from attnres_jax.data.token_files import TokenFileWriter, open_token_files, write_token_files
from attnres_jax.data.tokenizer import ByteTokenizer, tokenizer_from_metadata

RNG = np.random.default_rng(0)


def write_tree(root, files: dict[str, bytes]) -> None:
  for rel_path, data in files.items():
    path = root / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def text_files(count: int, suffix: str = ".txt") -> dict[str, bytes]:
  """`count` files of random printable bytes, some in subdirectories."""
  return {f"{'sub/' if i % 3 else ''}file{i:02d}{suffix}": RNG.integers(32, 127, RNG.integers(1, 200)).astype(
      np.uint8).tobytes() for i in range(count)}


def documented_split(rel_path: str, val_fraction: float) -> str:
  """The split rule of corpus.py's docstring, restated independently."""
  bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") % 10_000
  return "val" if bucket < val_fraction * 10_000 else "train"


def expected_tokens(files: dict[str, bytes], val_fraction: float, eod_id: int = 0) -> dict[str, np.ndarray]:
  streams = {"train": [], "val": []}
  for rel_path in sorted(files):
    streams[documented_split(rel_path, val_fraction)] += list(files[rel_path]) + [eod_id]
  return {split: np.array(ids, np.int64) for split, ids in streams.items()}


def build_byte_corpus(root: str, rel_paths, output_dir: str, val_fraction: float) -> dict:
  """The stdlib corpus's tokenisation (bytes as they are, end of document 0) of any directory."""
  return prepare_corpus(InputSpec(root, tuple(rel_paths), errors="keep"), output_dir,
                        ByteTokenizer(vocab_size=256, eod_id=0), val_fraction=val_fraction, workers=0,
                        provenance={}, show_progress=False)


def data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(source="token_files", path="", cache_dir="", val_fraction=0.02,
                                          tokenizer="bytes", bpe_vocab_size=4096))
  config.update(overrides)
  return config


# --- byte corpora and prepare_data --------------------------------------------------------------


def test_prepare_data_round_trip(tmp_path):
  files = text_files(30)
  write_tree(tmp_path / "in", {**files, "skip.bin": b"\1\2", ".hidden.txt": b"x", ".git/HEAD.txt": b"y"})
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "attnres_jax.data.prepare_data", f"--input_dir={tmp_path / 'in'}",
                  f"--output_dir={out}", "--val_fraction=0.3", "--extensions=.txt"], check=True)
  splits = load_splits(data_config(path=str(out)), vocab_size=257)
  expected = expected_tokens(files, 0.3, eod_id=256)  # bytes, then the reserved end-of-document id
  assert expected["train"].size and expected["val"].size
  np.testing.assert_array_equal(splits.train, expected["train"])
  np.testing.assert_array_equal(splits.val, expected["val"])
  metadata = splits.metadata
  assert sum(metadata["documents"].values()) == len(files)
  assert sum(metadata["num_bytes"].values()) == sum(map(len, files.values()))
  assert metadata["dtype"] == "uint16" and metadata["vocab_size"] == 257
  assert metadata["tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eod_id": 256, "eod_token": None,
                                   "file": None}
  assert metadata["sha256"]["train"] == hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()
  assert metadata["max_token_id"] == {split: int(tokens.max()) for split, tokens in expected.items()}


def test_split_is_per_path_and_stable(tmp_path):
  files = text_files(40)
  write_tree(tmp_path / "in", files)
  more = {**files, "zzz/new.txt": b"new"}
  write_tree(tmp_path / "in2", more)
  for name, tree in (("in", files), ("in2", more)):
    rel_paths = list_files(str(tmp_path / name), (".txt",))
    assert rel_paths == sorted(tree)
    metadata = build_byte_corpus(str(tmp_path / name), rel_paths, str(tmp_path / f"out_{name}"), 0.25)
    assert metadata["sha256"] == build_byte_corpus(  # rebuilding gives the same bytes
        str(tmp_path / name), rel_paths, str(tmp_path / f"out_{name}"), 0.25)["sha256"]
    assert all(in_validation(path, 0.25) == (documented_split(path, 0.25) == "val") for path in tree)
  # adding a file leaves every other file in its split
  first = open_token_files(str(tmp_path / "out_in"), vocab_size=256)
  second = open_token_files(str(tmp_path / "out_in2"), vocab_size=256)
  grown = "val" if in_validation("zzz/new.txt", 0.25) else "train"
  for split in ("train", "val"):
    extra = np.frombuffer(b"new\0", np.uint8) if split == grown else np.zeros(0, np.uint8)
    np.testing.assert_array_equal(getattr(second, split), np.concatenate([getattr(first, split), extra]))


def test_build_refuses_an_empty_split_and_leaves_no_output(tmp_path):
  write_tree(tmp_path / "in", {"only.txt": b"hello"})
  with pytest.raises(ValueError, match="no document in the"):
    build_byte_corpus(str(tmp_path / "in"), ["only.txt"], str(tmp_path / "out"), 0.02)
  assert sorted(os.listdir(tmp_path)) == ["in"]  # neither the target nor a temporary directory


def test_writer_refuses_to_replace_other_directories(tmp_path):
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "notes.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not a token-files directory"):
    write_token_files(str(tmp_path / "precious"), np.arange(3), np.arange(3), vocab_size=8, provenance={})
  assert os.listdir(tmp_path / "precious") == ["notes.txt"]


def test_writer_replaces_token_files_atomically(tmp_path):
  target = str(tmp_path / "tokens")
  write_token_files(target, np.arange(5), np.arange(2), vocab_size=70_000, provenance={"run": 1})
  write_token_files(target, np.arange(7), np.arange(3), vocab_size=70_000, provenance={"run": 2})
  splits = open_token_files(target, vocab_size=70_000)
  assert splits.metadata["dtype"] == "uint32" and splits.metadata["provenance"] == {"run": 2}
  np.testing.assert_array_equal(splits.train, np.arange(7))
  assert os.listdir(tmp_path) == ["tokens"]


def test_writer_records_the_largest_id_of_each_split(tmp_path):
  with TokenFileWriter(str(tmp_path / "tokens"), vocab_size=300) as writer:
    for chunk in ([3, 250, 7], [1], [299, 0]):
      writer.write("train", np.array(chunk))
    writer.write("val", np.array([5, 2]))
    metadata = writer.commit({})
  assert metadata["max_token_id"] == {"train": 299, "val": 5}
  assert json.loads((tmp_path / "tokens" / "metadata.json").read_text())["max_token_id"] == {"train": 299, "val": 5}


# --- the stdlib corpus --------------------------------------------------------------------------


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
  """A small stand-in for the stdlib, with packages that must not be part of the corpus."""
  root = tmp_path / "stdlib"
  files = text_files(20, ".py")
  write_tree(root, {**files, "site-packages/pip/x.py": b"no", "lib/dist-packages/y.py": b"no",
                    "README.txt": b"no"})
  monkeypatch.setattr(corpus, "stdlib_dir", lambda: str(root))
  return files


def test_stdlib_corpus_is_built_once_and_cached(tmp_path, monkeypatch, fake_stdlib):
  builds = []
  build = corpus.prepare_corpus
  monkeypatch.setattr(corpus, "prepare_corpus", lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs))
  config = data_config(source="stdlib", cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
  first = load_splits(config, vocab_size=256)
  train_bin = next((tmp_path / "cache").glob("stdlib-*")) / "train.bin"
  mtime = train_bin.stat().st_mtime_ns
  second = load_splits(config, vocab_size=256)
  assert len(builds) == 1 and train_bin.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(first.train, second.train)
  expected = expected_tokens(fake_stdlib, 0.3)  # site-packages, dist-packages and README.txt left out
  np.testing.assert_array_equal(second.train, expected["train"])
  np.testing.assert_array_equal(second.val, expected["val"])
  load_splits(data_config(source="stdlib", cache_dir=str(tmp_path / "cache"), val_fraction=0.5), vocab_size=256)
  assert len(builds) == 2  # a different corpus: rebuilt


def test_stdlib_bpe_corpus_is_cached_beside_the_bytes(tmp_path, fake_stdlib):
  config = data_config(source="stdlib", cache_dir=str(tmp_path / "cache"), val_fraction=0.3, tokenizer="bpe",
                       bpe_vocab_size=300)
  splits = load_splits(config, vocab_size=300)
  assert os.path.basename(splits.directory).endswith("-bpe300")
  assert splits.metadata["tokenizer"]["kind"] == "huggingface" and splits.metadata["vocab_size"] == 300
  assert splits.train.size < splits.metadata["num_bytes"]["train"]  # subword tokens
  mtime = os.stat(os.path.join(splits.directory, "train.bin")).st_mtime_ns
  load_splits(config, vocab_size=300)
  assert os.stat(os.path.join(splits.directory, "train.bin")).st_mtime_ns == mtime  # cached
  byte_splits = load_splits(data_config(source="stdlib", cache_dir=str(tmp_path / "cache"), val_fraction=0.3),
                            vocab_size=256)
  np.testing.assert_array_equal(byte_splits.train, expected_tokens(fake_stdlib, 0.3)["train"])


def test_legacy_byte_corpus_decodes_and_gives_bits_per_byte(tmp_path):
  """Byte corpora written before tokenizer records: the provenance's separator and bytes serve."""
  metadata = {"vocab_size": 256, "provenance": {"tokenizer": "bytes", "separator": 0, "bytes": {"train": 9,
                                                                                                "val": 4}}}
  tokenizer = tokenizer_from_metadata(metadata, str(tmp_path), where="test")
  assert (tokenizer.vocab_size, tokenizer.eod_id) == (256, 0)
  assert tokenizer.decode([104, 105, 0]) == "hi"
  assert token_files.text_bytes(metadata) == {"train": 9, "val": 4}


def test_real_stdlib_corpus(tmp_path):
  splits = load_splits(data_config(source="stdlib", cache_dir=str(tmp_path)), vocab_size=256)
  provenance = splits.metadata["provenance"]
  assert provenance["source_dir"] == corpus.stdlib_dir()
  rel_paths = list_files(corpus.stdlib_dir(), (".py",), corpus.STDLIB_EXCLUDED_DIRS)
  assert "os.py" in rel_paths and "json/decoder.py" in rel_paths
  assert not any({"site-packages", "dist-packages"} & set(path.split("/")) for path in rel_paths)
  assert sum(splits.metadata["documents"].values()) == len(rel_paths)
  for split in ("train", "val"):
    tokens = getattr(splits, split)
    # one end-of-document id per file
    assert tokens.size == splits.metadata["num_bytes"][split] + splits.metadata["documents"][split]
    assert int(tokens.max()) < 256
  assert splits.val.size < 0.1 * splits.train.size


# --- config errors ------------------------------------------------------------------------------


def break_metadata(path, **changes):
  metadata = json.loads((path / "metadata.json").read_text())
  metadata.update(changes)
  (path / "metadata.json").write_text(json.dumps(metadata))


BREAKAGES = {
    "missing_metadata": (lambda p: (p / "metadata.json").unlink(), FileNotFoundError, "metadata.json"),
    "missing_train": (lambda p: (p / "train.bin").unlink(), FileNotFoundError, "train.bin"),
    "missing_val": (lambda p: (p / "val.bin").unlink(), FileNotFoundError, "val.bin"),
    "unknown_dtype": (lambda p: break_metadata(p, dtype="int8"), ValueError, "dtype='int8'"),
    "ragged_size": (lambda p: (p / "train.bin").write_bytes((p / "train.bin").read_bytes() + b"\0"), ValueError,
                    "not a multiple"),
    "count_mismatch": (lambda p: break_metadata(p, num_tokens={"train": 5, "val": 20}), ValueError,
                       "metadata.json says 5"),
    "vocab_too_large": (lambda p: break_metadata(p, vocab_size=512), ValueError, "config.model.vocab_size=256"),
    "recorded_id_out_of_range": (lambda p: break_metadata(p, max_token_id={"train": 300, "val": 19}), ValueError,
                                 "token id 300"),  # train.bin itself is fine: caught from the metadata alone
    "malformed_max_token_id": (lambda p: break_metadata(p, max_token_id={"train": 99}), ValueError,
                               "max_token_id"),
    "token_out_of_range": (lambda p: (p / "val.bin").write_bytes(np.full(20, 300, "<u2").tobytes()), ValueError,
                           "token id 300"),
    "empty_split": (lambda p: ((p / "val.bin").write_bytes(b""), break_metadata(p, num_tokens={
        "train": 100, "val": 0})), ValueError, "val split is empty"),
}


@pytest.mark.parametrize("name", BREAKAGES)
def test_bad_token_files_name_the_field(tmp_path, name):
  breakage, error, detail = BREAKAGES[name]
  path = tmp_path / "tokens"
  write_token_files(str(path), np.arange(100) % 256, np.arange(20), vocab_size=256, provenance={})
  open_token_files(str(path), vocab_size=256)  # intact before the breakage
  breakage(path)
  with pytest.raises(error, match="config.data.path=") as info:
    load_splits(data_config(path=str(path)), vocab_size=256)
  assert detail in str(info.value)


@pytest.mark.parametrize("overrides,error,message", [
    (dict(path=""), ValueError, "config.data.path=''"),
    (dict(path="/nonexistent/tokens"), FileNotFoundError, "config.data.path='/nonexistent/tokens': no such"),
    (dict(source="web"), ValueError, "config.data.source='web'"),
])
def test_bad_data_config_names_the_field(overrides, error, message):
  with pytest.raises(error, match=message):
    load_splits(data_config(**overrides), vocab_size=256)


def test_smaller_data_vocab_is_accepted(tmp_path):
  write_token_files(str(tmp_path), np.arange(50), np.arange(10), vocab_size=64, provenance={})
  splits = load_splits(data_config(path=str(tmp_path)), vocab_size=256)
  assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.dtype("<u2")


# --- checking ids against max_token_id: a sample, not the whole split ---------------------------

NUM_TOKENS = 10_000


@pytest.fixture
def sampled_tokens(tmp_path, monkeypatch):
  """A token-files directory (ids < 200, vocab 256) whose train split is much larger than its check sample;
  returns the directory and the train positions the sample covers."""
  monkeypatch.setattr(token_files, "SAMPLE_CHUNK_BYTES", 64)  # 32 uint16 tokens a chunk
  path = tmp_path / "tokens"
  write_token_files(str(path), np.arange(NUM_TOKENS) % 200, np.arange(20), vocab_size=256, provenance={})
  covered = np.zeros(NUM_TOKENS, bool)
  for start, stop in token_files.sample_ranges(NUM_TOKENS, 32):
    covered[start:stop] = True
  assert covered[0] and covered[-1] and covered.sum() <= token_files.SAMPLE_CHUNKS * 32
  return path, covered


def replace_token(path, position: int, token_id: int) -> None:
  """Rewrites one id of train.bin in place (same size, metadata unchanged)."""
  tokens = np.fromfile(path / "train.bin", "<u2")
  tokens[position] = token_id
  tokens.tofile(path / "train.bin")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_sample_catches_ids_above_the_recorded_maximum(sampled_tokens, where):
  path, covered = sampled_tokens
  inside = np.flatnonzero(covered)
  replace_token(path, {"first": 0, "middle": inside[len(inside) // 2], "last": NUM_TOKENS - 1}[where], 250)
  with pytest.raises(ValueError, match="train.bin holds token id 250.*max_token_id=199"):  # 250 < vocab_size
    open_token_files(str(path), vocab_size=256)


def test_open_reads_only_the_sample(sampled_tokens):
  path, covered = sampled_tokens
  replace_token(path, np.flatnonzero(~covered)[0], 300)  # any full read would find 300 >= vocab_size
  splits = open_token_files(str(path), vocab_size=256)
  assert splits.metadata["max_token_id"]["train"] == 199


def test_metadata_without_max_token_id_is_scanned_in_full(sampled_tokens, caplog):
  path, covered = sampled_tokens
  metadata = json.loads((path / "metadata.json").read_text())
  del metadata["max_token_id"]
  (path / "metadata.json").write_text(json.dumps(metadata))
  open_token_files(str(path), vocab_size=256)
  assert '"max_token_id": {"train": 199, "val": 19}' in caplog.text  # the line to add, in the warning
  assert "max_token_id" not in json.loads((path / "metadata.json").read_text())  # the user's data left alone
  replace_token(path, np.flatnonzero(~covered)[0], 300)
  with pytest.raises(ValueError, match="train.bin holds token id 300 >= vocab_size=256"):
    open_token_files(str(path), vocab_size=256)


# --- pipelines ----------------------------------------------------------------------------------

TOKENS = np.arange(2000, dtype=np.uint16)  # token value = position: every window names its start


def take(iterator, count: int) -> list[np.ndarray]:
  return [next(iterator) for _ in range(count)]


def assert_windows(batch: np.ndarray, tokens: np.ndarray, seq_len: int) -> None:
  assert batch.dtype == np.int32 and batch.shape[1] == seq_len + 1
  for row in batch:
    start = int(row[0])
    np.testing.assert_array_equal(row, tokens[start:start + seq_len + 1])


def test_train_epoch_visits_every_start_once_then_reshuffles():
  tokens, seq_len = TOKENS[:48], 7  # 41 starts; batches of 8 cross epoch boundaries
  starts = np.concatenate([batch[:, 0] for batch in take(
      train_iterator(tokens, seq_len=seq_len, global_batch_size=8, seed=3), 12)])
  first, second = starts[:41], starts[41:82]
  assert sorted(first) == list(range(41)) and sorted(second) == list(range(41))
  assert not np.array_equal(first, second)


def test_train_stream_is_deterministic_per_seed():
  def stream(seed):
    return np.stack(take(train_iterator(TOKENS, seq_len=16, global_batch_size=4, seed=seed), 6))
  np.testing.assert_array_equal(stream(0), stream(0))
  assert not np.array_equal(stream(0), stream(1))
  for batch in stream(0):
    assert_windows(batch, TOKENS, 16)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(process_count):
  global_batches = take(train_iterator(TOKENS, seq_len=16, global_batch_size=8, seed=5), 4)
  local = [take(train_iterator(TOKENS, seq_len=16, global_batch_size=8, seed=5, process_index=p,
                               process_count=process_count), 4) for p in range(process_count)]
  for step, global_batch in enumerate(global_batches):
    for p in range(process_count):
      assert local[p][step].shape == (8 // process_count, 17)
      np.testing.assert_array_equal(local[p][step], global_batch[p::process_count])
    starts = np.concatenate([local[p][step][:, 0] for p in range(process_count)])
    assert len(set(starts.tolist())) == 8  # disjoint


def test_iterator_state_round_trip():
  make = lambda: train_iterator(TOKENS, seq_len=16, global_batch_size=4, seed=7, process_index=1, process_count=2)
  iterator = make()
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # plain data, as a checkpoint stores it
  following = take(iterator, 4)
  resumed = make()
  take(resumed, 1)  # somewhere else first: set_state must really move it
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(take(resumed, 4)), np.stack(following))


def test_eval_batches_are_fixed_evenly_spaced_and_sharded():
  kwargs = dict(seq_len=16, global_batch_size=4, num_batches=3)
  batches = eval_batches(TOKENS, **kwargs)
  assert len(batches) == 3 and all(batch.shape == (4, 17) for batch in batches)
  for batch in batches:
    assert_windows(batch, TOKENS, 16)
  starts = np.concatenate([batch[:, 0] for batch in batches])
  assert starts[0] == 0 and starts[-1] == TOKENS.size - 17
  assert np.ptp(np.diff(starts)) <= 1  # evenly spaced
  np.testing.assert_array_equal(np.stack(eval_batches(TOKENS, **kwargs)), np.stack(batches))
  for p in range(2):
    local = eval_batches(TOKENS, **kwargs, process_index=p, process_count=2)
    np.testing.assert_array_equal(np.stack(local), np.stack(batches)[:, p::2])


@pytest.mark.parametrize("make", [
    lambda **kwargs: train_iterator(seed=0, **kwargs),
    lambda **kwargs: eval_batches(num_batches=2, **kwargs),
], ids=["train", "eval"])
@pytest.mark.parametrize("tokens,seq_len,global_batch_size,process_count,message", [
    (np.arange(10), 10, 4, 1, "config.data.seq_len=10"),
    (np.arange(100), 8, 6, 4, "config.data.global_batch_size=6"),
    (np.zeros(0, np.uint16), 8, 4, 1, "split is empty"),
], ids=["seq_len", "global_batch_size", "empty"])
def test_pipeline_errors(make, tokens, seq_len, global_batch_size, process_count, message):
  with pytest.raises(ValueError, match=message):
    make(tokens=tokens, seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count)
