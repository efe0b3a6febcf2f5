"""The host-side controller: which compiled step trains on each batch.

The base network trains on every batch; the motivated network that extends it
trains on the batches where a *motivation condition* fires. The training loop
asks the controller, batch by batch, which step to run and tells it the loss
each batch produced (here with the default ``decision_lag=1``)::

    controller = Controller.from_config(cfg.motivation)
    for t, batch in enumerate(batches):
      kind = controller.next_kind()              # "base" or "motivated"
      state, metrics = train_steps[kind](state, batch)
      if t > 0:  # Batch t is dispatched; reading batch t-1's loss now costs no stall.
        controller.observe(t - 1, float(previous["loss"]))
      previous = metrics

Timing (``decision_lag`` L). The decision for batch t uses only the losses of
batches <= t-1-L (docs/choices.md, "The decision lag", says why L=1 is the
default and what L=0 costs). Losses observed early are held back until they
are due, so the decisions never depend on when the host happened to fetch a
loss: a loop that observes each loss at once and one that observes it a batch
late decide identically. Deciding a batch whose due losses were never observed raises
``MissingObservationError``. Every batch must be observed, once, in order,
whichever network trained on it and whatever the condition.

A missing loss. ``observe(t, None)`` says batch t has no loss to go by: its
loss or a gradient was not finite, so its update was not applied
(``steps``). It is observed all the same (the order above holds); the
conditions that read losses treat it as no evidence either way: it is neither
a fall nor a rise (``loss_streak``: the streak ends, since a streak is of
consecutive falls, and the smoothed loss is kept, since the state it measured
did not change). The conditions that go by the batch index alone are not
affected. ``missing_losses`` counts them, ``missing_in_a_row`` the current run
of them (the training loop stops a run after ``max_nonfinite_steps`` in a
row); both are in the checkpointed state.

Rules for batch t, first match wins:

1. a motivated phase is running          -> "motivated", reason "phase"
2. t < warmup_steps                      -> "base",      reason "warmup"
3. a cooldown is running                 -> "base",      reason "cooldown"
4. one more motivated batch would make more than ``max_fraction`` of the
   batches 0..t motivated                -> "base",      reason "max_fraction";
   a phase running is cut short here (rule 1 yields to this one), and its
   cooldown follows;
5. the condition fires (``evaluate(t)``) -> "motivated", reason "condition";
   this starts a phase of ``phase_steps`` motivated batches, this one included,
   and a cooldown of ``cooldown_steps`` base batches follows the phase;
   otherwise                             -> "base",      reason "condition".

``max_fraction`` (None: no cap) caps the cost whatever the condition does: after
any batch t, at most ``floor(max_fraction * (t + 1))`` batches were motivated.
The condition sees every due loss (also during phases, warmup, cooldown and
capped batches) but is evaluated only under rule 5; the score logged for the
other rules is 0.0.

Conditions (``make_condition(name, **params)``, or ``cfg.condition`` plus the
sub-dict of that name in the config):

* ``loss_streak(k=3, margin=0.0, ema=0.0)``: smoothed loss s (s = loss for the
  first loss, then s = ema*s_prev + (1-ema)*loss); a decrease is
  s < s_prev - margin*|s_prev|. Fires when the last k losses were all
  decreases; score = the streak length. A NaN/inf loss resets the streak and
  the smoothing; a missing loss (None) ends the streak and keeps the smoothing.
* ``every_n(n)``: fires on batches n-1, 2n-1, ...; score = (t+1) % n.
* ``random(p, seed=0)``: fires when u < p, u = random.Random(f"{seed}:{t}")
  .random() (a function of the batch index only: the same on every process
  and after a resume); score = u.
* ``replay(indices)``: fires exactly on the given batch indices (the paper's
  Experiment B: as many activations as a real run, at other batches). Like any
  condition it is not consulted during warmup, a phase or a cooldown.
* ``never``, ``always``.

``policy`` ("switch", "both" or "joint") is only validated and carried in the config
for the loop to pass to ``steps.make_train_steps``.

Checkpointing: ``state_dict()`` is a small JSON-serialisable dict holding the
configuration too; ``load_state_dict`` refuses a state saved under a different
configuration. The decision log is not part of the state: call
``drain_decisions()`` before checkpointing.

This module uses the Python standard library only (no JAX, no NumPy), and from
this package only the equally plain ``common`` and ``errors``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import operator
import random
from typing import Any, Callable, Mapping

from motivation_jax.common import POLICIES, SUBNETS, check_keys

CONDITIONS: dict[str, type] = {}


class MissingObservationError(RuntimeError):
  """A decision needs the loss of a batch that was never observed."""


def register_condition(name: str) -> Callable[[type], type]:
  """Class decorator: registers a ``Condition`` subclass under ``name``."""
  def register(cls: type) -> type:
    if name in CONDITIONS:
      raise ValueError(f"motivation condition {name!r} is already registered")
    cls.name = name
    CONDITIONS[name] = cls
    return cls
  return register


def _int(label: str, value: Any, minimum: int | None = None) -> int:
  """``value`` as an int (NumPy ints welcome, bools not), else a one-line ValueError."""
  try:
    result = None if isinstance(value, bool) else operator.index(value)
  except TypeError:
    result = None
  if result is None or (minimum is not None and result < minimum):
    bound = "" if minimum is None else f" >= {minimum}"
    raise ValueError(f"{label} must be an int{bound}, got {value!r}")
  return result


def _real(label: str, value: Any, low: float, high: float, high_open: bool) -> float:
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if not (ok and low <= value and (value < high if high_open else value <= high)):
    raise ValueError(f"{label} must be a number in [{low}, {high}{')' if high_open else ']'}, "
                     f"got {value!r}")
  return float(value)


class Condition:
  """Decides, from the losses seen so far, whether batch ``step`` is motivated."""

  name: str = ""
  # True or False: ``evaluate`` gives that answer at every batch, whatever the
  # losses (``Controller.kinds`` then tells a run which step kind never runs).
  constant: bool | None = None

  def __init__(self) -> None:
    pass  # Explicit, so make_condition reads "no parameters" off the signature.

  def observe(self, step: int, loss: float | None) -> None:
    """Feeds the loss of batch ``step`` (None: missing, see the module docstring);
    called in step order, due losses only."""

  def evaluate(self, step: int) -> tuple[bool, float]:
    """Returns (fire, score) for the decision about batch ``step``."""
    raise NotImplementedError

  def params(self) -> dict:
    """The constructor parameters, JSON-serialisable."""
    return {}

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, d: Mapping) -> None:
    if dict(d):
      raise ValueError(f"motivation condition {self.name!r} has no state, got {dict(d)!r}")


@register_condition("never")
class Never(Condition):
  constant = False

  def evaluate(self, step: int) -> tuple[bool, float]:
    return False, 0.0


@register_condition("always")
class Always(Condition):
  constant = True

  def evaluate(self, step: int) -> tuple[bool, float]:
    return True, 1.0


@register_condition("every_n")
class EveryN(Condition):

  def __init__(self, n: int):
    self.n = _int("motivation condition 'every_n': n", n, 1)

  def evaluate(self, step: int) -> tuple[bool, float]:
    phase = (step + 1) % self.n
    return phase == 0, float(phase)

  def params(self) -> dict:
    return {"n": self.n}


@register_condition("random")
class RandomFire(Condition):

  def __init__(self, p: float, seed: int = 0):
    self.p = _real("motivation condition 'random': p", p, 0.0, 1.0, high_open=False)
    self.seed = _int("motivation condition 'random': seed", seed)

  def evaluate(self, step: int) -> tuple[bool, float]:
    # A string seed hashes with SHA-512: independent of PYTHONHASHSEED and process.
    u = random.Random(f"{self.seed}:{step}").random()
    return u < self.p, u

  def params(self) -> dict:
    return {"p": self.p, "seed": self.seed}


@register_condition("replay")
class Replay(Condition):

  def __init__(self, indices: Any):
    label = "motivation condition 'replay': indices"
    if isinstance(indices, (str, bytes, Mapping)) or not hasattr(indices, "__iter__"):
      raise ValueError(f"{label} must be a sequence of non-negative ints, got {indices!r}")
    # Sorted and deduplicated, so equal index sets compare equal in configs.
    self.indices = tuple(sorted({_int(f"{label}: each index", i, 0) for i in indices}))
    self._fire_at = frozenset(self.indices)

  def evaluate(self, step: int) -> tuple[bool, float]:
    fire = step in self._fire_at
    return fire, float(fire)

  def params(self) -> dict:
    return {"indices": list(self.indices)}


@register_condition("loss_streak")
class LossStreak(Condition):

  def __init__(self, k: int = 3, margin: float = 0.0, ema: float = 0.0):
    label = "motivation condition 'loss_streak': "
    self.k = _int(label + "k", k, 1)
    self.margin = _real(label + "margin", margin, 0.0, math.inf, high_open=True)
    self.ema = _real(label + "ema", ema, 0.0, 1.0, high_open=True)
    self.smoothed: float | None = None  # None: no finite loss since the start or a reset.
    self.streak = 0

  def observe(self, step: int, loss: float | None) -> None:
    if loss is None:  # no evidence: not a fall, and what it would be compared with stays
      self.streak = 0
      return
    loss = float(loss)
    if not math.isfinite(loss):
      self.smoothed, self.streak = None, 0
      return
    previous = self.smoothed
    if previous is None:
      self.smoothed = loss
      return
    self.smoothed = self.ema * previous + (1.0 - self.ema) * loss
    decreased = self.smoothed < previous - self.margin * abs(previous)
    self.streak = self.streak + 1 if decreased else 0

  def evaluate(self, step: int) -> tuple[bool, float]:
    return self.streak >= self.k, float(self.streak)

  def params(self) -> dict:
    return {"k": self.k, "margin": self.margin, "ema": self.ema}

  def state_dict(self) -> dict:
    return {"smoothed": self.smoothed, "streak": self.streak}

  def load_state_dict(self, d: Mapping) -> None:
    if set(d) != {"smoothed", "streak"}:
      raise ValueError(f"loss_streak state must have keys smoothed, streak; got {sorted(d)}")
    smoothed = None if d["smoothed"] is None else float(d["smoothed"])
    self.smoothed, self.streak = smoothed, _int("loss_streak state: streak", d["streak"], 0)


def make_condition(name: str, **params: Any) -> Condition:
  """Builds the registered condition ``name``; params are checked one by one."""
  if name not in CONDITIONS:
    raise ValueError(f"unknown motivation condition {name!r}; known: "
                     f"{', '.join(sorted(CONDITIONS))}")
  signature = inspect.signature(CONDITIONS[name].__init__)
  accepted = {p.name: p.default is p.empty for p in signature.parameters.values()
              if p.name != "self"}
  check_keys(params, accepted, f"a parameter of the motivation condition {name!r}")
  for param, required in accepted.items():
    if required and param not in params:
      raise ValueError(f"motivation condition {name!r} needs parameter {param!r}")
  return CONDITIONS[name](**params)


@dataclasses.dataclass(frozen=True)
class Decision:
  """One decision: batch ``step`` runs ``kind``; ``reason`` is the rule that chose it."""
  step: int
  kind: str     # "base" or "motivated"
  score: float  # The condition's score when evaluated (reason "condition"), else 0.0.
  reason: str   # "phase", "warmup", "cooldown", "max_fraction" or "condition"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _json_normal(value: Any) -> Any:
  # Compares configs as JSON sees them: a tuple equals the list a checkpoint holds.
  return json.loads(json.dumps(value))


class Controller:
  """Decides batch by batch between the "base" and the "motivated" step."""

  TOP_LEVEL_KEYS = ("condition", "phase_steps", "warmup_steps", "cooldown_steps",
                    "decision_lag", "policy", "max_fraction")

  def __init__(self, condition: Condition, *, phase_steps: int = 1, warmup_steps: int = 0,
               cooldown_steps: int = 0, decision_lag: int = 1, policy: str = "switch",
               max_fraction: float | None = None):
    if not isinstance(condition, Condition):
      raise ValueError(f"condition must be a Condition, got {type(condition).__name__}")
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if max_fraction is not None:
      ok = isinstance(max_fraction, numbers.Real) and not isinstance(max_fraction, bool)
      if not (ok and 0 < max_fraction <= 1):
        raise ValueError(f"max_fraction must be a number in (0, 1] or None (no cap), "
                         f"got {max_fraction!r}")
      max_fraction = float(max_fraction)
    self._condition = condition
    self._config = {
        "condition": condition.name,
        "condition_params": _json_normal(condition.params()),
        "phase_steps": _int("phase_steps", phase_steps, 1),
        "warmup_steps": _int("warmup_steps", warmup_steps, 0),
        "cooldown_steps": _int("cooldown_steps", cooldown_steps, 0),
        "decision_lag": _int("decision_lag", decision_lag, 0),
        "policy": policy,
        # A checkpoint written before this key existed compares equal to None.
        "max_fraction": max_fraction,
    }
    self._step = 0
    self._phase_remaining = 0     # Motivated batches still due in the running phase.
    self._cooldown_remaining = 0  # Base batches still due after the last phase.
    self._held: list[list] = []   # [step, loss] observed but not yet due, in order.
    self._last_observed = -1
    self._counts = {"base": 0, "motivated": 0}
    self._activations = 0
    self._missing = 0             # Batches observed without a loss (None).
    self._missing_in_a_row = 0    # ... since the last batch with one.
    self._log: list[Decision] = []

  @classmethod
  def from_config(cls, cfg: Mapping) -> Controller:
    """Builds a controller from the ``motivation`` config (a mapping or ConfigDict)."""
    check_keys(cfg, cls.TOP_LEVEL_KEYS + tuple(sorted(CONDITIONS)), "a motivation config key")
    name = cfg["condition"] if "condition" in cfg else "loss_streak"
    params = dict(cfg[name]) if name in CONDITIONS and name in cfg else {}
    settings = {key: cfg[key] for key in cls.TOP_LEVEL_KEYS[1:] if key in cfg}
    return cls(make_condition(name, **params), **settings)

  @property
  def step(self) -> int:
    """The index of the next batch to decide."""
    return self._step

  @property
  def condition(self) -> Condition:
    return self._condition

  @property
  def config(self) -> dict:
    """The configuration, as ``state_dict()["config"]`` holds it."""
    return _json_normal(self._config)

  @property
  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  @property
  def activations(self) -> int:
    """How many motivated phases have started."""
    return self._activations

  @property
  def missing_losses(self) -> int:
    """How many batches were observed without a loss (``observe(t, None)``)."""
    return self._missing

  @property
  def missing_in_a_row(self) -> int:
    """How many of the last observed batches in a row had no loss."""
    return self._missing_in_a_row

  def kinds(self) -> tuple[str, ...]:
    """The step kinds ``next_kind`` can return over a whole run, in ``SUBNETS``
    order: one only when no setting can ever give the other (condition
    ``never``: the base; ``always`` with no warm-up, no cooldown and no cap
    below 1: the motivated model), both otherwise. A run compiles only these."""
    fires, c = self._condition.constant, self._config
    if fires is False:  # no phase ever starts, so nothing else can pick "motivated"
      return ("base",)
    if (fires is True and c["warmup_steps"] == 0 and c["cooldown_steps"] == 0
        and (c["max_fraction"] is None or c["max_fraction"] >= 1)):
      return ("motivated",)
    return SUBNETS

  def observe(self, step: int, loss: float | None) -> None:
    """Records the training loss of batch ``step`` (whichever network trained on it),
    or None: the batch has none (its update was not applied; module docstring)."""
    step = _int("observe: step", step)
    if step >= self._step:
      raise ValueError(f"observe({step}, ...): batch {step} has not been decided yet "
                       f"(next_kind() has decided {self._step} batches)")
    if step != self._last_observed + 1:
      raise ValueError(f"observe({step}, ...): expected batch {self._last_observed + 1} next "
                       f"(losses are observed in batch order, each once)")
    if loss is not None:
      try:
        loss = float(loss)
      except (TypeError, ValueError):
        raise ValueError(f"observe({step}, ...): loss must be a number or None, "
                         f"got {loss!r}") from None
    self._held.append([step, loss])
    self._last_observed = step
    self._missing += loss is None
    self._missing_in_a_row = self._missing_in_a_row + 1 if loss is None else 0

  def next_kind(self) -> str:
    """Decides batch ``self.step``, logs the decision, advances; "base" or "motivated"."""
    t, lag = self._step, self._config["decision_lag"]
    due = t - 1 - lag  # The last batch whose loss this decision may use.
    if self._last_observed < due:
      missing = self._last_observed + 1
      raise MissingObservationError(
          f"decision for batch {t} needs the loss of batch {missing} (decision_lag={lag}); "
          f"call observe({missing}, loss) first")
    while self._held and self._held[0][0] <= due:
      self._condition.observe(*self._held.pop(0))

    score = 0.0
    cap = self._config["max_fraction"]
    capped = cap is not None and self._counts["motivated"] + 1 > cap * (t + 1)
    if self._phase_remaining > 0 and not capped:
      kind, reason = "motivated", "phase"
      self._phase_remaining -= 1
      self._maybe_start_cooldown()
    elif t < self._config["warmup_steps"]:
      kind, reason = "base", "warmup"
    elif self._cooldown_remaining > 0:
      kind, reason = "base", "cooldown"
      self._cooldown_remaining -= 1
    elif capped:
      kind, reason = "base", "max_fraction"
      if self._phase_remaining > 0:  # the phase ends here; its cooldown follows
        self._phase_remaining = 0
        self._maybe_start_cooldown()
    else:
      fire, score = self._condition.evaluate(t)
      score = float(score)
      kind, reason = ("motivated" if fire else "base"), "condition"
      if fire:
        self._activations += 1
        self._phase_remaining = self._config["phase_steps"] - 1  # This batch is the first.
        self._maybe_start_cooldown()

    self._counts[kind] += 1
    self._log.append(Decision(step=t, kind=kind, score=score, reason=reason))
    self._step += 1
    return kind

  def _maybe_start_cooldown(self) -> None:
    if self._phase_remaining == 0:
      self._cooldown_remaining = self._config["cooldown_steps"]

  def drain_decisions(self) -> list[Decision]:
    """Returns the decisions made since the last drain, and forgets them."""
    drained, self._log = self._log, []
    return drained

  def state_dict(self) -> dict:
    """The whole state, JSON-serialisable (undrained decisions excluded)."""
    return {
        "config": self.config,
        "step": self._step,
        "phase_remaining": self._phase_remaining,
        "cooldown_remaining": self._cooldown_remaining,
        "held_losses": [list(pair) for pair in self._held],
        "last_observed_step": self._last_observed,
        "condition": _json_normal(self._condition.state_dict()),
        "counts": dict(self._counts),
        "activations": self._activations,
        "missing_losses": self._missing,
        "missing_in_a_row": self._missing_in_a_row,
    }

  # Keys a state saved before they existed may lack (it had no missing losses).
  _OPTIONAL_STATE = ("missing_losses", "missing_in_a_row")

  def load_state_dict(self, d: Mapping) -> None:
    """Restores ``state_dict()``; refuses a state saved under another configuration."""
    missing = [key for key in self.state_dict() if key not in d
               and key not in self._OPTIONAL_STATE]
    if missing:
      raise ValueError(f"controller state is missing {missing[0]!r}")
    saved, mine = _json_normal(d["config"]), self.config
    for key in sorted(set(saved) | set(mine)):
      if saved.get(key) != mine.get(key):
        raise ValueError(f"controller config differs from the checkpoint's: {key} is "
                         f"{mine.get(key)!r} here, {saved.get(key)!r} in the checkpoint")
    # Everything is converted before anything is assigned: a bad state changes nothing.
    held = [[_int("controller state: held step", s), None if loss is None else float(loss)]
            for s, loss in d["held_losses"]]
    d = {**dict.fromkeys(self._OPTIONAL_STATE, 0), **d}
    scalars = {key: _int(f"controller state: {key}", d[key], minimum)
               for key, minimum in (("step", 0), ("phase_remaining", 0),
                                    ("cooldown_remaining", 0), ("last_observed_step", -1),
                                    ("activations", 0), ("missing_losses", 0),
                                    ("missing_in_a_row", 0))}
    counts = {kind: _int(f"controller state: counts[{kind}]", d["counts"][kind], 0)
              for kind in ("base", "motivated")}
    self._condition.load_state_dict(d["condition"])
    self._step, self._held, self._counts = scalars["step"], held, counts
    self._phase_remaining = scalars["phase_remaining"]
    self._cooldown_remaining = scalars["cooldown_remaining"]
    self._last_observed = scalars["last_observed_step"]
    self._activations = scalars["activations"]
    self._missing = scalars["missing_losses"]
    self._missing_in_a_row = scalars["missing_in_a_row"]
    self._log = []

