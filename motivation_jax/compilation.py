"""JAX's persistent compilation cache for a run, and what the run compiled.

A run compiles the same programs every time its shapes are the same: both step
kinds, their evaluation, recalibration and checkpoint programs. JAX can keep
each compiled program on disk and read it back the next time
(docs.jax.dev, "Persistent compilation cache"); ``use_cache`` turns that on
for a run (``config.compilation_cache_dir``, ``--compilation_cache_dir`` of
``motivation_jax.export``), and ``CompileLog`` counts, during a run, the
programs XLA compiled and those read back from the cache, and their seconds
(``summary.json``'s ``compilation``). docs/compilation.md has where the
cache lives, what it costs and how to clear or move it.

Which directory (``cache_dir``), first that applies:

1. JAX's own setting, which it read at import: the environment variable
   ``JAX_COMPILATION_CACHE_DIR``, or a ``jax.config.update(
   "jax_compilation_cache_dir", ...)`` made before the run (a user embedding
   the package has already decided);
2. the config's value: a directory (a local path or a ``gs://`` URL); ``""``
   turns the cache off;
3. ``None`` (the default): ``$XDG_CACHE_HOME/motivation_jax/xla``, or
   ``~/.cache/motivation_jax/xla`` without ``XDG_CACHE_HOME``.

JAX's defaults cache only programs that took a second or more to compile;
every program of a CPU run takes less, so ``use_cache`` sets both thresholds
to nothing (unless the environment sets them: ``JAX_PERSISTENT_CACHE_*``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Mapping

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from motivation_jax import files
from motivation_jax.errors import ConfigError

ENV = "JAX_COMPILATION_CACHE_DIR"
# The thresholds below which JAX writes no entry, and what a run sets them to
# (every program of a CPU run compiles in under JAX's default second).
THRESHOLDS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": -1}

# The directory ``use_cache`` last set, so that the next run tells its own
# setting from one the user made (which wins).
_set_by_us: str | None = None


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
  """``$XDG_CACHE_HOME/motivation_jax/xla``, or ``~/.cache/motivation_jax/xla``."""
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "motivation_jax", "xla")


def cache_dir(value: Any, *, environ: Mapping[str, str] = os.environ,
              jax_value: str | None = None, label: str = "config.compilation_cache_dir"
              ) -> str | None:
  """The cache directory a run uses (None: off), in the order the module
  docstring gives; ``jax_value`` is JAX's setting that the user made (not one
  ``use_cache`` made). A value that is no path is a one-line ``ConfigError``."""
  if value is not None and not isinstance(value, str):
    raise ConfigError(f"{label} must be a directory, '' (no cache) or None (the default, "
                      f"{default_cache_dir(environ)}), got {value!r}")
  if environ.get(ENV):
    return environ[ENV]
  if jax_value:
    return jax_value
  if value is None:
    return default_cache_dir(environ)
  if value == "":
    return None
  return value if files.is_url(value) else os.path.expanduser(value)


def use_cache(value: Any, *, label: str = "config.compilation_cache_dir") -> str | None:
  """Turns JAX's persistent compilation cache on in ``cache_dir(value)`` (or off,
  for ``""``) for the programs this process compiles from now on; returns the
  directory, or None when off. A directory this process cannot write in is a
  one-line ``ConfigError`` naming ``label`` (JAX itself would only warn, at
  every compile, and go on compiling everything)."""
  global _set_by_us
  current = jax.config.jax_compilation_cache_dir
  user_set = current if current and current != _set_by_us else None
  directory = cache_dir(value, jax_value=user_set, label=label)
  if directory is not None:
    source = (ENV if os.environ.get(ENV) else
              "jax_compilation_cache_dir" if user_set else
              f"{label}'s default" if value is None else label)
    try:
      files.writable_directory(directory, source)
    except ConfigError as e:
      fix = (f"give {label} a directory this process can write in, or '' for no "
             "compilation cache" if source.startswith(label) else
             f"point {source} at a directory this process can write in, or unset it")
      raise ConfigError(f"{e}; {fix}") from e
    for name, threshold in THRESHOLDS.items():
      if name.upper() not in os.environ:
        jax.config.update(name, threshold)
  if directory != current:
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX opens its cache once per process, at the first compile that asks;
    # this makes the next compile open the new directory.
    jax_cache.reset_cache()
  _set_by_us = directory if user_set is None else _set_by_us
  return directory


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE_AND_LOWER = ("/jax/core/compile/jaxpr_trace_duration",
                    "/jax/core/compile/jaxpr_to_mlir_module_duration")
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileLog:
  """Counts, while entered, the programs XLA compiled and those JAX read from
  the persistent cache instead (``jax.monitoring``), with their seconds.

  A cache hit is JAX's ``cache_hits`` event, recorded inside the backend-compile
  span it ends, on the same thread: the span that follows a hit on its thread
  was a read. Tracing and lowering a function (``trace_and_lower_s``) is paid
  on a hit too: the cache is keyed by the lowered program.
  """
  compiled: int = 0
  from_cache: int = 0
  compile_s: float = 0.0
  cache_read_s: float = 0.0
  trace_and_lower_s: float = 0.0
  programs: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._hit = threading.local()
    self._lock = threading.Lock()

  def _on_event(self, event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
      self._hit.pending = True

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    if event in _TRACE_AND_LOWER:
      with self._lock:
        self.trace_and_lower_s += duration
    elif event == _BACKEND_COMPILE:
      hit = getattr(self._hit, "pending", False)
      self._hit.pending = False
      name = str(kwargs.get("fun_name", "?"))
      with self._lock:
        self.programs[name] = self.programs.get(name, 0) + 1
        if hit:
          self.from_cache += 1
          self.cache_read_s += duration
        else:
          self.compiled += 1
          self.compile_s += duration

  def __enter__(self) -> "CompileLog":
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)

  def summary(self, directory: str | None) -> dict[str, Any]:
    """What ``summary.json`` records under ``compilation``."""
    return {"compiled": self.compiled, "from_cache": self.from_cache,
            "compile_s": round(self.compile_s, 3), "cache_read_s": round(self.cache_read_s, 3),
            "trace_and_lower_s": round(self.trace_and_lower_s, 3),
            "cache_dir": directory, "programs": dict(sorted(self.programs.items()))}


def describe(compilation: Mapping[str, Any]) -> str:
  """One line for the end-of-run table."""
  line = (f"programs: {compilation['compiled']} compiled ({compilation['compile_s']:.1f} s)")
  if not compilation["cache_dir"]:
    return line + ", no compilation cache (compilation_cache_dir='')"
  return (line + f", {compilation['from_cache']} read from the cache "
          f"({compilation['cache_read_s']:.1f} s) in {compilation['cache_dir']}")
