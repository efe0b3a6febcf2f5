"""Every process takes the same decision: checked batch by batch, without a stall.

In a multi-process run each process runs its own controller, and they must
dispatch the same compiled step for every batch: a process that ran the base
step while another ran the motivated one would wait forever in mismatched
collectives. docs/choices.md ("The same decision on every process") says why
the decisions agree; this module checks that they do.

Each process folds every decision (the step kind it dispatches and the
controller's state after deciding: phase, cool-down, counts, the condition's
state, which holds the losses it has seen) into a running CRC-32 digest, seeded
with the controller's config and the state it resumed from. Before a batch's
step is dispatched, its digest goes to every process by an all-gather, itself
dispatched asynchronously (a tiny program ahead of the step in each device's
queue); the host reads it ``decision_lag`` batches later, just before it reads
that batch's loss, when both have long finished. A mismatch raises
``DecisionMismatch`` naming the first batch that differs, on every process alike
(they read the same gathered digests), before any process waits on the
outputs of a step the others did not run: one line, not a hang.

Why every batch rather than every N: a check every N batches would come after a
divergent batch's step, which is exactly where the processes hang; so the
exchange must precede each step. Asynchronous and four bytes per process, it
costs one small dispatch per batch and no device stall (docs/choices.md gives
the measured cost). A single-process run checks nothing.

One runtime does not wait: on CPUs, gloo (JAX's CPU collectives) checks the
sizes of what it receives and aborts the process ("Is there a distributed
collective mismatch in your code?") when the divergent step's collectives meet
the other processes' before the check reads the digests. The run still stops,
with gloo's message instead of this module's line; tests/test_launch.py accepts
either (about 1 run in 4 under load on the 2-core machine). NCCL and TPU
collectives wait instead, and the check fires before anything waits on them.

Test hook (tests only, never set it in a real run): ``MOTIVATION_JAX_TEST_FLIP_DECISION
=PROCESS:BATCH`` makes process PROCESS dispatch the other step kind at batch
BATCH, so that tests/test_launch.py can prove the check fires.
"""

from __future__ import annotations

import collections
import json
import os
import zlib

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from motivation_jax.controller import Controller
from motivation_jax.errors import ConfigError, TrainingError

FLIP_DECISION_ENV = "MOTIVATION_JAX_TEST_FLIP_DECISION"
_AXIS = "processes"
# Controller state that depends on when the host fetched a loss, not on the decisions.
_TIMING_KEYS = ("held_losses", "last_observed_step")


class DecisionMismatch(TrainingError):
  """The processes' decisions differ. The process exits at once after its one
  line (``cli.fail``): a step the others did not run may be in flight, and
  waiting for it at exit would hang."""
  exit_at_once = True


def _test_flip() -> tuple[int, int] | None:
  value = os.environ.get(FLIP_DECISION_ENV, "")
  if not value:
    return None
  try:
    process, batch = (int(v) for v in value.split(":"))
  except ValueError:
    raise ConfigError(f"{FLIP_DECISION_ENV} must be PROCESS:BATCH (a test hook), "
                      f"got {value!r}") from None
  return process, batch


def _digest(value, previous: int = 0) -> int:
  # json.dumps writes floats by repr: bit-exact, so equal digests mean equal losses seen.
  return zlib.crc32(json.dumps(value, sort_keys=True).encode(), previous)


class DecisionCheck:
  """``next_kind(t)`` in place of ``controller.next_kind()``: the same decision,
  checked against every other process's (see the module docstring)."""

  def __init__(self, controller: Controller):
    self._controller = controller
    self._lag = controller.config["decision_lag"]
    self._flip = _test_flip()
    self._active = jax.process_count() > 1
    self._queue: collections.deque = collections.deque()  # (batch, gathered digests)
    state = controller.state_dict()
    self._digest = _digest({k: v for k, v in state.items() if k not in _TIMING_KEYS})
    if self._active:
      # One entry per device, each process's devices together (make_array_from_
      # process_local_data needs a process's share contiguous).
      devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
      mesh = jax.make_mesh((len(devices),), (_AXIS,), devices=devices,
                           axis_types=(jax.sharding.AxisType.Auto,))
      self._processes = [d.process_index for d in devices]
      self._sharding = NamedSharding(mesh, P(_AXIS))
      self._gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))

  def next_kind(self, t: int) -> str:
    """The controller's decision for batch ``t`` (before its step is dispatched)."""
    kind = self._controller.next_kind()
    if self._flip is not None and self._flip == (jax.process_index(), t):
      kind = "motivated" if kind == "base" else "base"
    if not self._active:
      return kind
    state = self._controller.state_dict()
    self._digest = _digest([kind, {k: v for k, v in state.items() if k not in _TIMING_KEYS}],
                           self._digest)
    local = np.full(jax.local_device_count(), self._digest, np.uint32)
    self._queue.append((t, self._gather(
        jax.make_array_from_process_local_data(self._sharding, local))))
    # Batch t - lag's loss is read after this step's dispatch; its digests first.
    while self._queue and self._queue[0][0] <= t - self._lag:
      self._compare_oldest()
    return kind

  def flush(self) -> None:
    """Compares every pending batch (before anything waits on the last step's
    outputs: an evaluation, a checkpoint)."""
    while self._queue:
      self._compare_oldest()

  def _compare_oldest(self) -> None:
    t, gathered = self._queue.popleft()
    digests = np.asarray(gathered.addressable_data(0))
    if (digests == digests[0]).all():
      return
    by_process = dict(zip(self._processes, digests.tolist()))
    odd = [p for p, d in sorted(by_process.items()) if d != by_process[0]]
    raise DecisionMismatch(
        f"the processes' decisions differ at batch {t} (process{'es' if len(odd) > 1 else ''} "
        f"{', '.join(map(str, odd))} against process 0): a step that not every process runs "
        "would hang, so the run stops; every process must see the same config, checkpoint "
        "and losses (docs/choices.md)")
