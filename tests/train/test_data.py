"""Byte tokenizer, the file-level split, entropies and the grain windows."""

import math
import os

import numpy as np
import pytest

from dsv3_jax.train import data


def test_tokenizer_round_trip_and_vocab():
  tok = data.ByteTokenizer()
  ids = tok.encode("déf x = 1\n")
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == 11  # é is two bytes
  assert tok.decode(ids) == "déf x = 1\n"


def test_entropies_hand_computed():
  # Stream "abab...": unigram H = ln 2, and each byte determines the next (bigram H = 0).
  s = np.frombuffer(b"ab" * 500, np.uint8)
  h1, h2 = data.byte_entropies(s)
  assert h1 == pytest.approx(math.log(2))
  assert h2 == pytest.approx(0.0, abs=1e-9)
  # i.i.d. uniform over 4 symbols: both ~ ln 4.
  rng = np.random.default_rng(0)
  s = rng.integers(0, 4, 200_000).astype(np.uint8)
  h1, h2 = data.byte_entropies(s)
  assert h1 == pytest.approx(math.log(4), abs=1e-3)
  assert h2 == pytest.approx(math.log(4), abs=1e-3)


def test_default_corpus_split_is_disjoint_deterministic_and_matches_the_issue():
  files = data.list_corpus_files()
  assert all(f.endswith(".py") for _, f in files)
  assert not any(data._is_test_path(f) for _, f in files)
  held = {f for _, f in files if data.is_heldout(f, 0.05)}
  assert held == {f for _, f in files if data.is_heldout(f, 0.05)}
  assert 0 < len(held) < len(files) / 5
  c = data.load_corpus(None, 0.05)
  total = len(c.train) + len(c.heldout)
  assert 8e6 < total < 20e6  # ~13 MB of stdlib on Python 3.11
  h1, h2 = data.byte_entropies(c.train)
  # The issue measured 3.24 and 2.44 nats on this corpus (Python 3.11).
  assert h1 == pytest.approx(3.24, abs=0.1) and h2 == pytest.approx(2.44, abs=0.1)
  assert h2 < h1


def test_custom_paths_and_errors(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 50)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("more text " * 50)
  (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
  files = data.list_corpus_files([str(tmp_path)])
  assert [f for _, f in files] == ["a.txt", os.path.join("sub", "b.md")]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.list_corpus_files([str(tmp_path / "nope")])
  with pytest.raises(ValueError, match="heldout_fraction"):
    data.load_corpus([str(tmp_path)], 1.5)


def test_windows_are_contiguous_and_batches_are_random_access():
  stream = np.arange(1000, dtype=np.uint8)
  ds = data.train_dataset(stream, seq_len=16, extra=1, batch_size=4, seed=0)
  b = ds[3]
  assert b.shape == (4, 18) and b.dtype == np.int32
  for row in b:
    assert np.all(np.diff(row.astype(np.int64)) % 256 == 1)  # a contiguous slice
    assert row[0] % 16 == 0  # windows start at multiples of seq_len
  np.testing.assert_array_equal(ds[3], b)  # the step index alone fixes the batch (resume)
  ev = data.eval_windows(stream, seq_len=16, extra=1, n=5)
  assert ev.shape == (5, 18) and ev[0, 0] == 0


def test_few_files_are_split_within_files_and_short_text_names_the_file(tmp_path):
  window = 66
  # Four files: the hash split holds none of them out at 5 %, so each file's tail is held out.
  for i in range(4):
    (tmp_path / f"f{i}.txt").write_text(f"file {i} text. " * 40)  # 520 bytes
  files = data.list_corpus_files([str(tmp_path)])
  assert not any(data.is_heldout(rel, 0.05) for _, rel in files)
  c = data.load_corpus([str(tmp_path)], 0.05, window=window)
  assert c.split == "within_files" and (c.n_train_files, c.n_heldout_files) == (4, 4)
  assert len(c.heldout) == 4 * 26 + 3 and len(c.train) == 4 * 494 + 3  # 5 % of each, NUL-joined
  # One file of three windows: the held-out tail is shorter than a window, so the last window
  # of the text is held out.
  one = tmp_path / "one.txt"
  one.write_bytes(b"x" * (3 * window))
  c = data.load_corpus([str(one)], 0.05, window=window)
  assert (len(c.train), len(c.heldout)) == (2 * window, window)
  assert data.eval_windows(c.heldout, seq_len=64, extra=1, n=8).shape == (1, window)
  short = tmp_path / "short.txt"
  short.write_text("too short")
  with pytest.raises(ValueError, match=rf"short.txt\) is 9 bytes; the train and the held-out "
                     rf"split need at least one window of {window} bytes"):
    data.load_corpus([str(short)], 0.05, window=window)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=r"every file in data.paths is empty \(.*empty.txt\)"):
    data.load_corpus([str(empty)], 0.05, window=window)
