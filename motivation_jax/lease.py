"""One run per workdir: a lease taken before a run writes anything there.

Two runs on one workdir (a SLURM job requeued while the old allocation drains,
a script restarted while the old process lingers, two terminals) would
interleave their logs and checkpoints; the second one refuses instead. The
lease is the file ``DIR/lease.json`` (an object, on a bucket) holding who has
the workdir: the run id (shared by every process of a multi-process run), the
host, the process id, when it started and when it last renewed the lease, and
its ``ttl_s``. A run

- **takes** it before anything is written (``run_setup.setup``), by creating the
  file only if it is absent: locally a complete temporary file hard-linked to
  the name (atomic on local disks and on NFS, where ``flock`` cannot be
  trusted; ``open(..., "x")`` where links are not supported), on a bucket an
  upload with the precondition ``ifGenerationMatch=0``;
- **renews** it every ``ttl_s / 4`` from a background thread: locally after
  checking the file is still its own, on a bucket with ``ifGenerationMatch``
  = the generation it wrote last, so a renewal never overwrites another run's
  lease;
- **releases** it (deletes the file) on every exit path: the end, an error,
  SIGTERM or SIGINT. A SIGKILL leaves it to expire.

A second run that finds a live lease **refuses** in one line
(``WorkdirInUse``, status 2 from the command line) and writes nothing. A
lease is **stale**, and the next run takes it over with one ``warning:``
line, when its holder ran on this host (same boot and process namespace) and
its process is gone, or else when it has not been renewed for its ``ttl_s``
(``config.lease_ttl_s``, 60 s by default; the host clocks must agree to well
within it, as NTP keeps them). Taking over is itself exclusive: on a bucket an
upload with ``ifGenerationMatch`` = the stale lease's generation; locally the
exclusive creation of ``lease.json.takeover-<the stale lease's token>``, which
only one run can make, before the file is replaced.

A run whose lease was taken over while it lived (it stalled for longer than
``ttl_s``: a stopped process, a hung file system) notices at its next renewal,
prints one ``warning:`` line, and stops with ``TrainingError`` before it
writes its next checkpoint (``Lease.check``).

In a multi-process run process 0 alone takes, renews and releases the lease;
it sends the outcome (the run id, or the refusal) to the other processes
(``acquire_for_run``), so all of them refuse together or none does, and they
never refuse each other.

``python -m motivation_jax.export`` reads a workdir without a lease; it asks
``holder`` whether a live run is writing a checkpoint it was asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from motivation_jax import files
from motivation_jax.errors import ConfigError, TrainingError, WorkdirInUse

FILE = "lease.json"
TAKEOVER = FILE + ".takeover-"
DEFAULT_TTL_S = 60.0
# Renewals per ttl_s: a lease misses three before it can be called stale.
RENEWALS_PER_TTL = 4


# --- who and where -------------------------------------------------------------

def _read_first_line(path: str) -> str:
  try:
    with open(path) as f:
      return f.readline().strip()
  except OSError:
    return ""


def machine_id() -> str:
  """What makes "on this host" true: the host name, the kernel's boot id and
  this process's PID namespace (two containers of one name on two machines,
  or in two PID namespaces of one, cannot see each other's processes)."""
  boot = _read_first_line("/proc/sys/kernel/random/boot_id")
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = ""
  return f"{socket.gethostname()}/{boot}/{namespace}"


def _process_start(pid: int) -> str | None:
  """The start time of process ``pid`` (clock ticks since boot, Linux), which
  tells a reused process id from the process that held the lease; None when
  it cannot be read; "zombie" for a process that exited and was not reaped."""
  stat = _read_first_line(f"/proc/{pid}/stat")
  if not stat:
    return None
  fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces
  if fields and fields[0] == "Z":
    return "zombie"
  return fields[19] if len(fields) > 19 else None


def _process_gone(pid: int, start: str | None) -> bool:
  """Whether process ``pid`` of this host has exited (or its id was reused)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # another user's live process
    pass
  now = _process_start(pid)
  return now == "zombie" or (start is not None and now is not None and now != start)


def _ago(seconds: float) -> str:
  seconds = max(seconds, 0.0)
  if seconds < 120:
    return f"{seconds:.0f} s ago"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min ago"
  return f"{seconds / 3600:.1f} h ago"


def _utc(timestamp: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def describe(record: dict, *, now: float | None = None, renewed: bool = True) -> str:
  """``run 1a2b... on host h, process 123, started ..., renewed its lease 3 s ago``
  (the last part with ``renewed``)."""
  now = time.time() if now is None else now
  if record.get("unreadable"):
    return (f"a lease file that cannot be read ({record['unreadable']}), last changed "
            f"{_ago(now - record['mtime'])}")
  processes = record.get("processes", 1)
  of = f" (process 0 of {processes})" if processes > 1 else ""
  text = (f"run {record.get('run_id', '?')} on host {record.get('host', '?')}, process "
          f"{record.get('pid', '?')}{of}, started {_utc(record.get('started_at', 0))}")
  if renewed:
    text += f", renewed its lease {_ago(now - record.get('renewed_at', 0))}"
  return text


def stale_reason(record: dict, *, now: float | None = None, ttl_s: float = DEFAULT_TTL_S
                 ) -> str | None:
  """Why the lease ``record`` may be taken over, or None while it is live.

  ``ttl_s`` is used only for a lease that does not state its own."""
  now = time.time() if now is None else now
  if record.get("unreadable"):
    age = now - record["mtime"]
    return (f"it cannot be read and has not changed for {age:.0f} s (more than "
            f"{ttl_s:g} s)") if age > ttl_s else None
  if record.get("machine") == machine_id() and isinstance(record.get("pid"), int):
    if _process_gone(record["pid"], record.get("pid_start")):
      return f"its process {record['pid']} no longer runs on this host"
  ttl = float(record.get("ttl_s", ttl_s))
  age = now - float(record.get("renewed_at", 0))
  if age > ttl:
    return f"it was last renewed {age:.0f} s ago, more than its lease_ttl_s={ttl:g}"
  return None


# --- where the lease lives ------------------------------------------------------

class _LocalStore:
  """``DIR/lease.json`` on a local or shared file system. The version of a
  lease is its token (a new one for each holder)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, FILE)

  def read(self) -> tuple[dict | None, Any]:
    try:
      with open(self.path) as f:
        text = f.read()
      mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return None, None
    except IsADirectoryError:
      raise ConfigError(f"{self.path} is a folder, not a file: a run writes its lease there; "
                        "move it away or pick another --workdir") from None
    try:
      record = json.loads(text)
      return record, record["token"]
    except (ValueError, KeyError, TypeError) as e:
      why = "empty" if not text else f"{type(e).__name__}"
      return {"unreadable": why, "mtime": mtime}, ("unreadable", mtime)

  def _temporary(self, text: str) -> str:
    tmp = os.path.join(self.directory, f".{FILE}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def create(self, text: str) -> Any | None:
    """Creates the file if it is absent; its version, or None if it exists."""
    tmp = self._temporary(text)
    try:
      os.link(tmp, self.path)  # atomic, all at once, and exclusive, also on NFS
    except FileExistsError:
      return None
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK,
                         errno.ENOSYS):
        raise
      try:  # a file system without hard links: exclusive creation, then the content
        with open(self.path, "x") as f:
          f.write(text)
          f.flush()
          os.fsync(f.fileno())
      except FileExistsError:
        return None
    finally:
      os.remove(tmp)
    return json.loads(text)["token"]

  def _marker(self, version: Any) -> str:
    """The takeover marker of the lease of ``version``."""
    name = (f"unreadable-{int(version[1] * 1e6)}" if isinstance(version, tuple)
            else str(version))
    return os.path.join(self.directory, TAKEOVER + name)

  def take_over(self, stale_version: Any, text: str) -> Any | None:
    """Replaces the stale lease of version ``stale_version`` if no other run
    does first: only one run can create its takeover marker."""
    try:
      with open(self._marker(stale_version), "x") as f:
        f.write(text)
    except FileExistsError:
      return None
    os.replace(self._temporary(text), self.path)
    return json.loads(text)["token"]

  def renew(self, version: Any, text: str, displaced: Any = None) -> Any | None:
    """Rewrites the lease if it is still ours; None if another run has it."""
    marker = self._marker(version)
    _, current = self.read()
    # ``displaced``: the stale holder we took over from, which may have renewed
    # once more before it noticed: put ours back. A lease that is gone is lost.
    if current is None or current not in (version, displaced) or os.path.exists(marker):
      return None
    os.replace(self._temporary(text), self.path)
    return None if os.path.exists(marker) else version

  def delete(self, version: Any, displaced: Any = None) -> None:
    _, current = self.read()
    if current != version:
      return
    os.remove(self.path)
    # The markers of earlier takeovers (this run's, and those of runs killed
    # after taking over) name leases that are gone.
    for name in os.listdir(self.directory):
      if name.startswith(TAKEOVER):
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(self.directory, name))


class _BucketStore:
  """``gs://bucket/DIR/lease.json``: every change a request with a generation
  precondition (``ifGenerationMatch``), which Cloud Storage applies
  atomically. The version of a lease is the object's generation."""

  def __init__(self, url: str):
    from google.cloud import storage  # the [gcs] extra; only for a gs:// workdir
    from google.api_core import exceptions
    rest = url[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)
    self._bucket = storage.Client().bucket(bucket)
    self.name = "/".join(p for p in (prefix.strip("/"), FILE) if p)
    self.path = f"gs://{bucket}/{self.name}"

  def read(self) -> tuple[dict | None, Any]:
    blob = self._bucket.get_blob(self.name)
    if blob is None:
      return None, None
    try:
      text = blob.download_as_text(if_generation_match=blob.generation)
    except self._failed:  # replaced or deleted between the two requests
      return self.read()
    try:
      return json.loads(text), blob.generation
    except ValueError as e:
      return {"unreadable": type(e).__name__, "mtime": blob.updated.timestamp()}, blob.generation

  def _upload(self, text: str, generation: int) -> int | None:
    blob = self._bucket.blob(self.name)
    try:
      blob.upload_from_string(text, content_type="application/json",
                              if_generation_match=generation)
    except self._failed:
      # A retried request whose first try succeeded fails its precondition:
      # the lease is ours if it holds our token.
      record, current = self.read()
      token = json.loads(text)["token"]
      return current if record is not None and record.get("token") == token else None
    return blob.generation

  def create(self, text: str) -> int | None:
    return self._upload(text, 0)

  def take_over(self, stale_version: int, text: str) -> int | None:
    return self._upload(text, stale_version)

  def renew(self, version: int, text: str, displaced: Any = None) -> int | None:
    return self._upload(text, version)

  def delete(self, version: int, displaced: Any = None) -> None:
    with contextlib.suppress(*self._failed):  # gone, or not ours any more
      self._bucket.blob(self.name).delete(if_generation_match=version)


def _store(workdir: str):
  if files.is_url(workdir):
    if not workdir.startswith("gs://"):
      raise ConfigError(f"--workdir={workdir}: a run's lease (one run per workdir) works on "
                        "local paths and gs:// buckets only")
    return _BucketStore(workdir)
  return _LocalStore(workdir)


# --- the lease -------------------------------------------------------------------

# Leases this process holds, by lease path: released at exit if still held
# (a ``run_setup.setup`` whose run was never closed).
_HELD: dict[str, "Lease"] = {}
_HELD_LOCK = threading.Lock()


@atexit.register
def _release_all() -> None:
  for held in list(_HELD.values()):
    with contextlib.suppress(Exception):
      held.release()


class Lease:
  """The lease this process holds on a workdir (``acquire``)."""

  def __init__(self, store, workdir: str, record: dict, version: Any, *,
               displaced: Any = None, warn: Callable[[str], None]):
    self._store, self.workdir, self.record = store, workdir, record
    self._version, self._displaced, self._warn = version, displaced, warn
    self.ttl_s = float(record["ttl_s"])
    self.run_id = record["run_id"]
    self.path = store.path
    self.lost: str | None = None
    self._last_renewal = time.time()
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._released = False
    self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                    name=f"lease renewal {workdir}")
    self._thread.start()

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.ttl_s / RENEWALS_PER_TTL):
      self.renew()

  def renew(self) -> None:
    """Renews the lease now (the background thread calls this)."""
    with self._lock:
      if self._released or self.lost:
        return
      record = {**self.record, "renewed_at": time.time(),
                "renewals": self.record.get("renewals", 0) + 1}
      try:
        version = self._store.renew(self._version, json.dumps(record), self._displaced)
      except Exception as e:  # a file system or bucket that fails for a moment
        if time.time() - self._last_renewal > self.ttl_s:
          self._lose(f"it could not be renewed for {self.ttl_s:g} s ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})")
        return
      if version is None:
        current, _ = self._read_quietly()
        self._lose(f"another run took it over: {describe(current)}" if current else
                   f"{self.path} was removed")
        return
      self.record, self._version, self._last_renewal = record, version, record["renewed_at"]

  def _read_quietly(self):
    try:
      return self._store.read()
    except Exception:
      return None, None

  def _lose(self, why: str) -> None:
    self.lost = why
    self._warn(f"warning: this run lost its lease on {self.workdir} ({why}); it stops "
               "before it writes its next checkpoint")

  def check(self) -> None:
    """Raises ``TrainingError`` once the lease is lost (before a write that
    could mix with another run's)."""
    if self.lost:
      raise TrainingError(f"this run lost its lease on {self.workdir} ({self.lost}); another "
                          "run may be writing there, so this one stops without writing more")

  def release(self) -> None:
    """Deletes the lease (if still ours) and stops renewing; idempotent."""
    with self._lock:
      if self._released:
        return
      self._released = True
    self._stop.set()
    if threading.current_thread() is not self._thread:
      self._thread.join()
    with _HELD_LOCK:
      if _HELD.get(self.path) is self:
        del _HELD[self.path]
    if self.lost:
      return
    try:
      self._store.delete(self._version, self._displaced)
    except Exception as e:  # the error that ends the run, if any, is the one to report
      self._warn(f"warning: could not release the lease {self.path} ({type(e).__name__}: "
                 f"{e}); the next run takes it over once it is stale")

  @contextlib.contextmanager
  def released_on_sigterm(self):
    """While inside, a SIGTERM releases the lease, then acts as it did before
    (by default: ends the process). For the parts of a run where nothing else
    catches SIGTERM (``run_setup.setup``); single-process runs only, where no JAX
    preemption service owns the signal."""
    if _multi_process() or threading.current_thread() is not threading.main_thread():
      yield
      return

    def handler(signum, frame):
      self.release()
      signal.signal(signum, before)
      signal.raise_signal(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    before = signal.SIG_DFL if previous is None else previous
    try:
      yield
    finally:
      if signal.getsignal(signal.SIGTERM) is handler:
        signal.signal(signal.SIGTERM, before)

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class Follower:
  """What a process other than 0 of a multi-process run holds: process 0's
  lease, known by its run id; nothing to renew or release here."""

  lost = None

  def __init__(self, workdir: str, run_id: str):
    self.workdir, self.run_id = workdir, run_id

  def check(self) -> None:
    pass

  def release(self) -> None:
    pass

  @contextlib.contextmanager
  def released_on_sigterm(self):
    yield

  def __enter__(self) -> "Follower":
    return self

  def __exit__(self, *exc) -> None:
    pass


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def busy_message(workdir: str, record: dict, what: str = "run") -> str:
  return (f"{workdir} is in use by another {what}: {describe(record)} ({files.join(workdir, FILE)}); "
          "two runs in one workdir would mix their checkpoints and logs, so this one stops "
          f"without writing anything: wait for that {what} to end, stop it, or pick another "
          "--workdir")


def acquire(workdir: str, *, ttl_s: float = DEFAULT_TTL_S, run_id: str | None = None,
            processes: int = 1, what: str = "run",
            warn: Callable[[str], None] = _stderr) -> Lease:
  """Takes the lease on ``workdir`` (an existing directory or bucket path) for
  this process, or raises ``WorkdirInUse`` naming the live holder. A stale
  lease is taken over with one ``warning:`` line (module docstring)."""
  if not (isinstance(ttl_s, (int, float)) and ttl_s > 0):
    raise ConfigError(f"config.lease_ttl_s must be a number > 0, got {ttl_s!r}")
  workdir = files.resolve(workdir)
  store = _store(workdir)
  with _HELD_LOCK:
    mine = _HELD.get(store.path)
  if mine is not None:
    raise WorkdirInUse(f"{workdir} is in use by this process already (run {mine.run_id}: a "
                       "train.setup whose run was not closed; call run.close())")
  now = time.time()
  record = {"run_id": run_id or uuid.uuid4().hex[:16], "token": uuid.uuid4().hex,
            "what": what, "host": socket.gethostname(), "machine": machine_id(),
            "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "processes": processes, "started_at": now, "renewed_at": now, "renewals": 0,
            "ttl_s": float(ttl_s), "command": " ".join(sys.argv)[:500]}
  for _ in range(3):
    version = store.create(json.dumps(record))
    if version is not None:
      return _hold(Lease(store, workdir, record, version, warn=warn))
    current, current_version = store.read()
    if current is None:
      continue  # released in between: try again
    why = stale_reason(current, ttl_s=ttl_s)
    if why is None:
      raise WorkdirInUse(busy_message(workdir, current, what))
    record["renewed_at"] = time.time()
    version = store.take_over(current_version, json.dumps(record))
    if version is not None:
      warn(f"warning: taking over the stale lease on {workdir} of "
           f"{describe(current, renewed=False)}: {why}")
      return _hold(Lease(store, workdir, record, version, displaced=current_version, warn=warn))
    # Another run took the stale lease over first: the next read names it.
  raise WorkdirInUse(f"{workdir} is in use by another {what}: its lease changed hands while this "
                     "run tried to take it; pick another --workdir or try again later")


def _hold(held: Lease) -> Lease:
  with _HELD_LOCK:
    _HELD[held.path] = held
  return held


def holder(workdir: str) -> dict | None:
  """The live lease on ``workdir`` (its record), or None when there is none or
  it is stale; reads only."""
  record, _ = _store(files.resolve(workdir)).read()
  if record is None or stale_reason(record) is not None:
    return None
  return record


# --- multi-process runs ---------------------------------------------------------

_VERDICT_BYTES = 4096


def _multi_process() -> bool:
  """Whether this process is one of several, without starting a JAX backend
  (``jax.process_count()`` would: a run refused before it touches a device
  should not start one)."""
  return jax.distributed.is_initialized()


def _broadcast(verdict: dict) -> dict:
  """Process 0's ``verdict`` on every process (a fixed-size byte array)."""
  data = np.zeros(_VERDICT_BYTES, np.uint8)
  if jax.process_index() == 0:
    encoded = json.dumps(verdict).encode()[:_VERDICT_BYTES]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return json.loads(bytes(data).rstrip(b"\0").decode())


def acquire_for_run(workdir: str, *, ttl_s: float = DEFAULT_TTL_S) -> Lease | Follower:
  """``acquire`` for a run of any number of processes: process 0 takes the
  lease, and every process gets the same outcome (the others a ``Follower``
  of the same run id, or the same ``WorkdirInUse``)."""
  if not _multi_process() or jax.process_count() == 1:
    return acquire(workdir, ttl_s=ttl_s)
  held, verdict, error = None, {}, None
  if jax.process_index() == 0:
    try:
      held = acquire(workdir, ttl_s=ttl_s, processes=jax.process_count())
      verdict = {"run_id": held.run_id}
    except WorkdirInUse as e:
      error, verdict = e, {"busy": str(e)}
    except Exception as e:  # the others must not wait for a lease that never comes
      error, verdict = e, {"failed": f"{type(e).__name__}: {e}"}
  verdict = _broadcast(verdict)
  if error is not None:
    raise error
  if "busy" in verdict:
    raise WorkdirInUse(verdict["busy"])
  if "failed" in verdict:
    raise TrainingError(f"process 0 could not take the lease on {workdir}: "
                        f"{verdict['failed']}")
  return held if held is not None else Follower(files.resolve(workdir), verdict["run_id"])
