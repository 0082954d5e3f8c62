"""Byte-level text data: the embedded default corpus, a file-level train / held-out split, and a
grain pipeline of fixed-length windows.

The default corpus is the running Python's standard library source (`sysconfig` "stdlib" path,
every `*.py` file, test directories and `test_*.py` files excluded: about 13 MB on Python 3.11),
so a fresh machine trains on real text with nothing downloaded. `config.data.paths` points at
other text files or directories instead.

The train / held-out split (`load_corpus`), deterministic across machines:

* by file, when that works: a file is held out when the md5 of its path relative to its root,
  read as a number in [0, 1), is below `data.heldout_fraction`; each split is the concatenation
  of its files with a NUL byte between them. Used when both splits get at least one file and
  at least one window (seq_len + 1 + MTP depth bytes) of text.
* within files otherwise (one file, a few files, or a hash split that leaves a split empty):
  the last `heldout_fraction` of every file's bytes is held out and the rest trains; when that
  gives less than one window of held-out text, the last window of the whole text is held out.
  Any text of at least two windows (one to train on, one to evaluate) works.

Empty files are skipped; text too short for a split raises, naming the files and the split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from typing import Iterable, Optional, Sequence

import numpy as np

DOC_SEPARATOR = 0  # NUL: never appears in source text
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
_TEST_DIRS = {"test", "tests", "idle_test"}


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256, id = byte value."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    """str -> [n] int32 byte values."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Token ids -> str (invalid UTF-8 sequences are replaced)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def default_corpus_root() -> str:
  """This Python's standard library directory."""
  return sysconfig.get_paths()["stdlib"]


def _is_test_path(rel: str) -> bool:
  parts = rel.replace(os.sep, "/").split("/")
  return bool(_TEST_DIRS.intersection(parts[:-1])) or parts[-1].startswith("test_")


def list_corpus_files(paths: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
  """(root, relative path) of every corpus file, sorted.

  Args:
    paths: None for the default corpus (stdlib *.py, tests excluded); otherwise files or
      directories (directories contribute every file with a suffix in TEXT_SUFFIXES).

  Raises:
    FileNotFoundError: a path that does not exist (named in the message).
    ValueError: no text files found.
  """
  out: list[tuple[str, str]] = []
  if paths is None:
    root = default_corpus_root()
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if d not in _TEST_DIRS and d != "site-packages"
                           and d != "__pycache__")
      for name in filenames:
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        if name.endswith(".py") and not _is_test_path(rel):
          out.append((root, rel))
  else:
    if isinstance(paths, str):
      paths = [paths]
    for p in paths:
      if not os.path.exists(p):
        raise FileNotFoundError(f"data.paths: {p!r} does not exist")
      if os.path.isfile(p):
        out.append((os.path.dirname(os.path.abspath(p)), os.path.basename(p)))
        continue
      for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in filenames:
          if name.endswith(TEXT_SUFFIXES):
            out.append((p, os.path.relpath(os.path.join(dirpath, name), p)))
  if not out:
    raise ValueError(f"data.paths={paths!r}: no text files found (suffixes {TEXT_SUFFIXES})")
  return sorted(out)


def is_heldout(rel_path: str, fraction: float) -> bool:
  """Deterministic file-level split: md5(relative path) mapped to [0, 1) below `fraction`."""
  h = int.from_bytes(hashlib.md5(rel_path.encode("utf-8")).digest()[:8], "little")
  return h / 2**64 < fraction


@dataclasses.dataclass
class Corpus:
  """Train and held-out byte streams (uint8), files joined by DOC_SEPARATOR.

  split: "files" (whole files held out by hash) or "within_files" (the tail of each file held
    out); see the module docstring.
  """

  train: np.ndarray
  heldout: np.ndarray
  n_train_files: int
  n_heldout_files: int
  split: str = "files"


def _names(files, limit: int = 3) -> str:
  shown = [os.path.join(root, rel) for root, rel in files[:limit]]
  return ", ".join(shown) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def load_corpus(paths: Optional[Sequence[str]] = None, heldout_fraction: float = 0.05,
                window: int = 1) -> Corpus:
  """Reads the corpus and splits it into train and held-out text (module docstring).

  Args:
    paths: as `list_corpus_files`.
    heldout_fraction: share of files (split by file) or of each file's bytes (within files).
    window: bytes of one training / evaluation window (seq_len + 1 + MTP depth); each split
      must hold at least one.

  Raises:
    ValueError: `heldout_fraction` outside (0, 1), every file empty, or text shorter than two
      windows (the message names the files and the split).
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"data.heldout_fraction must be in (0, 1), got {heldout_fraction}")
  files = list_corpus_files(paths)
  contents = []
  for root, rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      contents.append(f.read())
  nonempty = [(fr, c) for fr, c in zip(files, contents) if c]
  if not nonempty:
    raise ValueError(f"data: every file in data.paths is empty ({_names(files)}); both the "
                     "train and the held-out split need text")
  sep = bytes([DOC_SEPARATOR])
  as_array = lambda parts: np.frombuffer(sep.join(parts), dtype=np.uint8)
  train = [(fr, c) for fr, c in nonempty if not is_heldout(fr[1], heldout_fraction)]
  held = [(fr, c) for fr, c in nonempty if is_heldout(fr[1], heldout_fraction)]
  joined = lambda part: sum(len(c) for _, c in part) + max(len(part) - 1, 0)
  if train and held and joined(train) >= window and joined(held) >= window:
    return Corpus(as_array([c for _, c in train]), as_array([c for _, c in held]), len(train),
                  len(held), "files")
  # Within files: the tail of every file is held out.
  total = joined(nonempty)
  if total < 2 * window:
    raise ValueError(
        f"data: the text in data.paths ({_names([fr for fr, _ in nonempty])}) is {total} bytes; "
        f"the train and the held-out split need at least one window of {window} bytes each "
        f"(data.seq_len + 1 + MTP depth), {2 * window} bytes in all: add text or lower "
        "data.seq_len")
  cuts = [len(c) - int(round(len(c) * heldout_fraction)) for _, c in nonempty]
  tr = [c[:k] for (_, c), k in zip(nonempty, cuts) if k > 0]
  he = [c[k:] for (_, c), k in zip(nonempty, cuts) if k < len(c)]
  train_s, held_s = as_array(tr), as_array(he)
  if len(held_s) < window or len(train_s) < window:
    whole = as_array([c for _, c in nonempty])
    train_s, held_s = whole[:-window], whole[-window:]
  n = len(nonempty)
  return Corpus(train_s, held_s, n, n, "within_files")


def byte_entropies(stream: np.ndarray) -> tuple[float, float]:
  """(unigram entropy H(X), bigram conditional entropy H(X_t | X_{t-1})) in nats per byte.

  The reference points a byte-level model has to beat: a model at the bigram entropy uses one
  byte of context; below it, it uses more.
  """
  x = stream.astype(np.int64)
  p1 = np.bincount(x, minlength=256) / len(x)
  nz = p1 > 0
  h1 = float(-np.sum(p1[nz] * np.log(p1[nz])))
  pair = np.bincount(x[:-1] * 256 + x[1:], minlength=256 * 256).reshape(256, 256).astype(np.float64)
  joint = pair / pair.sum()
  prev = joint.sum(axis=1, keepdims=True)
  nz = joint > 0
  cond = np.where(nz, joint / np.where(prev > 0, prev, 1.0), 1.0)
  h2 = float(-np.sum(joint[nz] * np.log(cond[nz])))
  return h1, h2


class WindowSource:
  """grain random-access source: window i = stream[i * stride : i * stride + length]."""

  def __init__(self, stream: np.ndarray, length: int, stride: int):
    if len(stream) < length:
      raise ValueError(f"a split of {len(stream)} bytes is shorter than one window of {length}")
    self.stream, self.length, self.stride = stream, length, stride
    self.n = (len(stream) - length) // stride + 1

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.stride
    return self.stream[start:start + self.length].astype(np.int32)


def train_dataset(stream: np.ndarray, *, seq_len: int, extra: int, batch_size: int, seed: int):
  """Shuffled, repeated, batched windows of seq_len + 1 + extra tokens (extra = MTP depth).

  Returns:
    grain.MapDataset; element `step` is the batch for training step `step`
    ([batch_size, seq_len + 1 + extra] int32), so resuming at a step needs no iterator state.
  """
  import grain

  source = WindowSource(stream, seq_len + 1 + extra, seq_len)
  return (grain.MapDataset.source(source).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True))


def eval_windows(stream: np.ndarray, *, seq_len: int, extra: int, n: int) -> np.ndarray:
  """[n', seq_len + 1 + extra] int32 held-out windows spread evenly over the stream
  (n' = min(n, windows available))."""
  source = WindowSource(stream, seq_len + 1 + extra, seq_len)
  idx = np.unique(np.linspace(0, len(source) - 1, num=min(n, len(source))).astype(np.int64))
  return np.stack([source[i] for i in idx])
