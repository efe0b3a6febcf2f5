"""A run's own files, in a local directory or under a bucket URL (``gs://...``).

Orbax writes checkpoints through ``etils.epath`` (and TensorStore's own Cloud
Storage driver for the arrays), so a checkpoint directory may be a URL. The
files a run writes beside them (``metrics.jsonl``, ``decisions.jsonl``,
``summary.json``; TensorBoard's events go through tensorboardX, which writes
``gs://`` itself) go through this module, with the same paths either way.

Cloud Storage objects cannot be appended to, and each write replaces a whole
object atomically. So on a URL ``append_lines`` rewrites the object with the
new lines added, and writers buffer lines between the moments they must be
durable (before a checkpoint, at the end): a run writes each such file about
once per checkpoint, and a reader never sees half a line. On a local path a
line is appended and flushed as it comes, as before, and ``fsync``-ed when it
must survive a kill of the machine.

Standard library, etils and ``errors`` only: ``metrics`` and ``experiments`` use
it too.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterable

from etils import epath

from motivation_jax.errors import ConfigError


def is_url(path: str | os.PathLike) -> bool:
  """``gs://bucket/...`` and other ``scheme://`` paths (Orbax's and epath's)."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """``path`` made absolute when it is local (Orbax wants absolute paths); a URL
  is kept as it is (``os.path.abspath`` would make it a local ``gs:`` directory)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(*parts: str) -> str:
  if is_url(parts[0]):
    return os.fspath(epath.Path(parts[0]).joinpath(*parts[1:]))
  return os.path.join(*parts)


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(p)


def exists(p: str) -> bool:
  return epath.Path(p).exists()


def is_dir(p: str) -> bool:
  return epath.Path(p).is_dir()


def is_file(p: str) -> bool:
  """Whether ``p`` is a file (on a bucket: an object of exactly that name)."""
  return epath.Path(p).is_file()


def make_dirs(p: str) -> None:
  """Creates directory ``p`` and its parents (on a bucket: nothing to create
  but a marker, which epath handles)."""
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def list_dir(p: str) -> list[str]:
  """The names in directory ``p``, sorted."""
  return sorted(q.name for q in epath.Path(p).iterdir())


def read_text(p: str) -> str:
  return epath.Path(p).read_text()


def write_text(p: str, text: str) -> None:
  """Replaces file ``p`` with ``text`` in one step: locally through a temporary
  file and a rename, so a kill leaves the old or the new content; an object
  upload is atomic already."""
  if is_url(p):
    epath.Path(p).write_text(text)
    return
  with open(p + ".tmp", "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(p + ".tmp", p)


def append_lines(p: str, lines: Iterable[str]) -> None:
  """Appends ``lines`` (each ending in a newline) to file ``p``, durably: on
  disk (locally, ``fsync``-ed) or in the bucket before this returns."""
  lines = list(lines)
  if is_url(p):
    if lines:
      old = read_text(p) if exists(p) else ""
      epath.Path(p).write_text(old + "".join(lines))
    return
  with open(p, "a") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())


class LineFile:
  """A JSON-lines file kept open for appending (``metrics.jsonl``): locally
  each line is written and flushed at once (``tail -f`` follows it); on a URL
  lines wait in memory until ``sync`` (each sync rewrites the object, see the
  module docstring)."""

  def __init__(self, p: str):
    self.path = p
    self._pending: list[str] = []
    self._file = None if is_url(p) else open(p, "a")

  def write(self, line: str) -> None:
    if self._file is None:
      self._pending.append(line)
    else:
      self._file.write(line)
      self._file.flush()

  def sync(self) -> None:
    """Everything written so far is durable once this returns."""
    if self._file is None:
      append_lines(self.path, self._pending)
      self._pending = []
    else:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    self.sync()
    if self._file is not None:
      self._file.close()


def writable_directory(p: str, label: str) -> str:
  """Makes directory ``p`` (and its parents) if need be and checks that this
  process can write in it; else a one-line ``ConfigError`` naming ``label``
  (e.g. ``--workdir``). Writing a file is the test: permission bits say
  nothing to root, a read-only mount only answers a write, and a bucket's
  permissions answer only a request."""
  if not p:
    raise ConfigError(f"{label} is empty; give a directory")
  try:
    make_dirs(p)
    probe = join(p, f".write-test-{uuid.uuid4().hex}")
    if is_url(p):
      epath.Path(probe).write_text("")
      epath.Path(probe).unlink()
    else:
      with open(probe, "w"):
        pass
      os.remove(probe)
  except Exception as e:  # OSError locally; a bucket's clients raise their own types
    why = getattr(e, "strerror", None) or str(e).split("\n")[0] or type(e).__name__
    if isinstance(e, FileExistsError) or (exists(p) and not is_dir(p)):
      why = "it is a file, not a directory"
    elif isinstance(e, NotADirectoryError):
      why = "a part of its path is a file, not a directory"
    raise ConfigError(f"cannot write in {label}={p}: {why}") from e
  return p
