"""The host-side motivation controller: conditions, timing, phases, checkpoints."""

import json
import math
import os
import pathlib
import random
import subprocess
import sys

import pytest

from motivation_jax import controller as mc
from motivation_jax.controller import (CONDITIONS, Controller, Decision,
                                       MissingObservationError, make_condition)

NAN, INF = float("nan"), float("inf")
CONTROLLER_FILE = pathlib.Path(mc.__file__).resolve()


def trace(condition, losses):
  """(fire, score) of the decision that follows each loss, fed straight to a condition."""
  out = []
  for i, loss in enumerate(losses):
    condition.observe(i, loss)
    out.append(condition.evaluate(i + 1))
  return out


def fires(condition, losses):
  return [fire for fire, _ in trace(condition, losses)]


def run(controller, losses, *, late=False):
  """A training loop: decide batch t, then observe its loss at once (or batch t-1's, late)."""
  kinds = []
  for t in range(len(losses)):
    kinds.append(controller.next_kind())
    if late:
      if t > 0:
        controller.observe(t - 1, losses[t - 1])
    else:
      controller.observe(t, losses[t])
  return kinds


def noisy_losses(n, seed=0, nan_at=()):
  """A downward trend with noise, so streaks start and break."""
  rng = random.Random(seed)
  return [NAN if i in nan_at else 5.0 * 0.99 ** i + rng.uniform(-0.08, 0.08)
          for i in range(n)]


def error_line(exc_info):
  message = str(exc_info.value)
  assert "\n" not in message
  return message


# ------------------------------------------------------------------------- conditions


def test_registry_holds_every_condition():
  assert sorted(CONDITIONS) == ["always", "every_n", "loss_streak", "never", "random", "replay"]
  for name, cls in CONDITIONS.items():
    assert cls.name == name


def test_loss_streak_fires_exactly_after_k_consecutive_decreases():
  losses = [10, 9, 8, 7, 6, 6.5, 6, 5, 4, 3.9]
  got = trace(make_condition("loss_streak", k=3), losses)
  assert [score for _, score in got] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
  assert [fire for fire, _ in got] == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 2


def test_loss_streak_equal_loss_breaks_the_streak():
  assert fires(make_condition("loss_streak", k=1), [3, 2, 2, 1]) == [False, True, False, True]


def test_loss_streak_margin_is_relative_and_blocks_small_decreases():
  losses = [10.0, 9.95, 9.9, 9.85]  # About 0.5% per step.
  assert fires(make_condition("loss_streak", k=3), losses)[-1] is True
  assert fires(make_condition("loss_streak", k=3, margin=0.001), losses)[-1] is True
  assert not any(fires(make_condition("loss_streak", k=3, margin=0.01), losses))
  # Relative: the same 0.5% decreases at a loss 1000x smaller behave identically.
  small = [x / 1000 for x in losses]
  assert not any(fires(make_condition("loss_streak", k=3, margin=0.01), small))
  assert fires(make_condition("loss_streak", k=3, margin=0.001), small)[-1] is True


def test_loss_streak_ema_smoothing_finds_the_trend_in_a_zigzag():
  losses = [10, 8, 9, 7, 8, 6, 7, 5]  # Falls, rises, falls, ...: the raw streak stays <= 1.
  raw = trace(make_condition("loss_streak", k=3), losses)
  assert max(score for _, score in raw) == 1 and not any(f for f, _ in raw)
  smooth = make_condition("loss_streak", k=3, ema=0.8)
  got = trace(smooth, losses)
  # s = 10, 9.6, 9.48, 8.984, 8.7872, ...: every smoothed value is a decrease.
  assert [score for _, score in got] == [0, 1, 2, 3, 4, 5, 6, 7]
  assert [f for f, _ in got] == [False] * 3 + [True] * 5
  assert smooth.smoothed == pytest.approx(7.3870464)


@pytest.mark.parametrize("ema", [0.0, 0.5])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_loss_streak_non_finite_loss_resets_streak_and_smoothing(bad, ema):
  condition = make_condition("loss_streak", k=3, ema=ema)
  got = trace(condition, [10, 9, 8, 7, bad, 5, 4, 3])
  # After the reset, 5 is a new first loss, not a decrease from the old smoothed value.
  assert [score for _, score in got] == [0, 1, 2, 3, 0, 0, 1, 2]
  assert [f for f, _ in got] == [False, False, False, True, False, False, False, False]
  assert condition.smoothed == (3.0 if ema == 0.0 else 3.75)


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_loss_streak_missing_loss_ends_the_streak_and_keeps_the_smoothing(ema):
  condition = make_condition("loss_streak", k=2, ema=ema)
  got = trace(condition, [10, 9, 8, None, 7, 6, None, None, 5])
  # A missing loss is not a fall (the streak ends) and not a new start: 7 is
  # compared with the smoothed value before it, so it is a fall at once.
  assert [score for _, score in got] == [0, 1, 2, 0, 1, 2, 0, 0, 1]
  assert [f for f, _ in got] == [False, False, True, False, False, True, False, False, False]
  with_gap = condition.smoothed
  without = make_condition("loss_streak", k=2, ema=ema)
  trace(without, [10, 9, 8, 7, 6, 5])
  assert with_gap == without.smoothed  # the smoothing never saw the gaps


def test_missing_losses_are_counted_held_and_resumed():
  ctrl = Controller(make_condition("loss_streak", k=1), decision_lag=1)
  run(ctrl, [3.0, None, None, 2.0, None])
  assert ctrl.missing_losses == 3 and ctrl.missing_in_a_row == 1
  state = json.loads(json.dumps(ctrl.state_dict()))
  assert state["held_losses"] == [[3, 2.0], [4, None]]  # not due yet at lag 1
  assert (state["missing_losses"], state["missing_in_a_row"]) == (3, 1)
  resumed = Controller(make_condition("loss_streak", k=1), decision_lag=1)
  resumed.load_state_dict(state)
  assert json.dumps(resumed.state_dict()) == json.dumps(state)
  for c in (ctrl, resumed):
    c.next_kind()
    c.observe(5, None)
    assert (c.missing_losses, c.missing_in_a_row) == (4, 2)
  assert ctrl.next_kind() == resumed.next_kind()
  assert ctrl.state_dict() == resumed.state_dict()
  # A state saved before these counters existed resumes with none missing.
  older = {k: v for k, v in state.items() if not k.startswith("missing")}
  older["held_losses"] = [[3, 2.0], [4, 1.0]]
  again = Controller(make_condition("loss_streak", k=1), decision_lag=1)
  again.load_state_dict(older)
  assert (again.missing_losses, again.missing_in_a_row) == (0, 0)


def test_never_always_every_n():
  assert [make_condition("never").evaluate(t) for t in range(3)] == [(False, 0.0)] * 3
  assert [make_condition("always").evaluate(t) for t in range(3)] == [(True, 1.0)] * 3
  every = make_condition("every_n", n=3)
  assert [t for t in range(12) if every.evaluate(t)[0]] == [2, 5, 8, 11]
  assert [every.evaluate(t)[1] for t in range(4)] == [1.0, 2.0, 0.0, 1.0]
  assert all(make_condition("every_n", n=1).evaluate(t)[0] for t in range(5))


@pytest.mark.parametrize("name, settings, kinds", [
    ("never", {}, ("base",)),
    ("never", {"phase_steps": 4, "warmup_steps": 2, "max_fraction": 0.5}, ("base",)),
    ("always", {"phase_steps": 3}, ("motivated",)),
    ("always", {"max_fraction": 1.0}, ("motivated",)),
    ("always", {"warmup_steps": 2}, ("base", "motivated")),
    ("always", {"cooldown_steps": 1}, ("base", "motivated")),
    ("always", {"max_fraction": 0.5}, ("base", "motivated")),
    ("every_n", {"n": 3}, ("base", "motivated")),
    ("loss_streak", {}, ("base", "motivated")),
])
def test_kinds_are_what_the_controller_can_pick(name, settings, kinds):
  """A run compiles only ``kinds()`` (run_setup): each kind it leaves out must
  never come out of ``next_kind``, and a kind it keeps must be pickable."""
  settings = dict(settings)
  params = {k: settings.pop(k) for k in ("n",) if k in settings}
  c = Controller(make_condition(name, **params), **settings)
  assert c.kinds() == kinds
  picked = set()
  for t in range(60):
    picked.add(c.next_kind())
    c.observe(t, 1.0 / (t + 1))  # falling: loss_streak fires
  assert picked == set(kinds)


def test_replay_fires_exactly_at_the_given_indices():
  indices = [17, 3, 4, 40, 3]
  replay = make_condition("replay", indices=indices)
  assert [t for t in range(100) if replay.evaluate(t)[0]] == [3, 4, 17, 40]
  assert replay.evaluate(4) == (True, 1.0) and replay.evaluate(5) == (False, 0.0)
  assert replay.params() == {"indices": [3, 4, 17, 40]}
  ctrl = Controller(make_condition("replay", indices=indices), decision_lag=0)
  kinds = run(ctrl, [1.0] * 60)
  assert [t for t, k in enumerate(kinds) if k == "motivated"] == [3, 4, 17, 40]


def test_random_is_step_seeded_reproducible_and_has_the_right_rate():
  a, b = make_condition("random", p=0.1, seed=7), make_condition("random", p=0.1, seed=7)
  pattern = [a.evaluate(t) for t in range(10_000)]
  # Order of evaluation does not matter: the draw is a function of (seed, step).
  assert [b.evaluate(t) for t in reversed(range(10_000))][::-1] == pattern
  assert pattern[5][1] == random.Random("7:5").random()
  rate = sum(f for f, _ in pattern) / len(pattern)
  assert 0.085 < rate < 0.115
  other = [make_condition("random", p=0.1, seed=8).evaluate(t) for t in range(10_000)]
  assert other != pattern
  assert not any(make_condition("random", p=0.0).evaluate(t)[0] for t in range(1000))
  assert all(make_condition("random", p=1.0).evaluate(t)[0] for t in range(1000))


def test_condition_state_round_trips_through_json():
  condition = make_condition("loss_streak", k=2, ema=0.3)
  trace(condition, [4, 3, 2.5])
  state = json.loads(json.dumps(condition.state_dict()))
  fresh = make_condition("loss_streak", k=2, ema=0.3)
  fresh.load_state_dict(state)
  assert trace(fresh, [2, 2.2, 1]) == trace(condition, [2, 2.2, 1])


@pytest.mark.parametrize("name, params, culprit", [
    ("loss_streak", {"k": 0}, "k"),
    ("loss_streak", {"k": 2.0}, "k"),
    ("loss_streak", {"k": True}, "k"),
    ("loss_streak", {"margin": -0.1}, "margin"),
    ("loss_streak", {"ema": 1.0}, "ema"),
    ("loss_streak", {"ema": -0.5}, "ema"),
    ("loss_streak", {"window": 3}, "window"),
    ("every_n", {"n": 0}, "n"),
    ("every_n", {}, "n"),
    ("random", {"p": 1.5}, "p"),
    ("random", {"p": NAN}, "p"),
    ("random", {"p": 0.5, "seed": "x"}, "seed"),
    ("replay", {"indices": [1, -2]}, "indices"),
    ("replay", {"indices": [1, 2.5]}, "indices"),
    ("replay", {"indices": "12"}, "indices"),
    ("never", {"k": 3}, "k"),
])
def test_bad_condition_params_name_the_condition_and_the_parameter(name, params, culprit):
  with pytest.raises(ValueError) as exc_info:
    make_condition(name, **params)
  message = error_line(exc_info)
  assert f"'{name}'" in message and culprit in message


def test_unknown_condition_lists_the_known_ones():
  with pytest.raises(ValueError) as exc_info:
    make_condition("xyz")
  assert error_line(exc_info) == ("unknown motivation condition 'xyz'; known: always, "
                                  "every_n, loss_streak, never, random, replay")


# ------------------------------------------------------------------------- timing


def test_lag_one_ignores_the_previous_loss_even_when_observed_early():
  ctrl = Controller(make_condition("loss_streak", k=1), decision_lag=1)
  assert run(ctrl, [10.0, 9.0]) == ["base", "base"]
  # Batch 1's loss (a decrease) is observed, but the decision for batch 2 may not use it.
  assert ctrl.next_kind() == "base"
  assert ctrl.condition.streak == 0
  ctrl.observe(2, 8.0)
  assert ctrl.next_kind() == "motivated"  # Batch 3 uses losses <= 1.


def test_lag_one_decision_does_not_depend_on_the_latest_loss():
  kinds = []
  for last in (0.1, 100.0, NAN):
    ctrl = Controller(make_condition("loss_streak", k=2), decision_lag=1)
    run(ctrl, [5.0, 4.0, 3.0, last])
    kinds.append(ctrl.next_kind())
  assert kinds == ["motivated"] * 3


def test_eager_and_late_observation_give_identical_decisions():
  losses = noisy_losses(300, nan_at={100})
  make = lambda: Controller(make_condition("loss_streak", k=2, ema=0.2), phase_steps=2,
                            cooldown_steps=1, decision_lag=1)
  eager, late = make(), make()
  kinds = run(eager, losses)
  assert run(late, losses, late=True) == kinds
  assert eager.drain_decisions() == late.drain_decisions()
  assert 10 < kinds.count("motivated") < 290


def test_lag_zero_and_lag_one_shift_decisions_by_one_batch():
  losses = noisy_losses(300)
  lag0 = run(Controller(make_condition("loss_streak", k=2), decision_lag=0), losses)
  lag1 = run(Controller(make_condition("loss_streak", k=2), decision_lag=1), losses)
  assert lag1[0] == "base" and lag1[1:] == lag0[:-1]
  assert lag0 != lag1 and "motivated" in lag0
  lag2 = run(Controller(make_condition("loss_streak", k=2), decision_lag=2), losses)
  assert lag2[:2] == ["base", "base"] and lag2[2:] == lag0[:-2]


def test_lag_zero_uses_the_previous_loss():
  ctrl = Controller(make_condition("loss_streak", k=1), decision_lag=0)
  assert run(ctrl, [10.0, 9.0]) == ["base", "base"]
  assert ctrl.next_kind() == "motivated"


def test_forgetting_to_observe_raises_missing_observation():
  ctrl = Controller(make_condition("loss_streak"), decision_lag=1)
  ctrl.next_kind()
  ctrl.next_kind()
  ctrl.observe(0, 1.0)
  ctrl.next_kind()  # Batch 2 needs losses <= 0.
  with pytest.raises(MissingObservationError) as exc_info:
    ctrl.next_kind()
  assert isinstance(exc_info.value, RuntimeError)
  assert error_line(exc_info) == ("decision for batch 3 needs the loss of batch 1 "
                                  "(decision_lag=1); call observe(1, loss) first")
  assert ctrl.step == 3 and len(ctrl.drain_decisions()) == 3  # The failure changed nothing.
  ctrl.observe(1, 1.0)
  assert ctrl.next_kind() == "base" and ctrl.step == 4


def test_lag_zero_loop_that_observes_late_raises():
  with pytest.raises(MissingObservationError, match="batch 1 needs the loss of batch 0"):
    run(Controller(make_condition("never"), decision_lag=0), [1.0, 2.0, 3.0], late=True)


@pytest.mark.parametrize("calls, step, match", [
    (3, 1, "expected batch 0 next"),       # Skips batch 0.
    (0, 0, "has not been decided yet"),
    (2, 2, "has not been decided yet"),
])
def test_observe_out_of_order_or_undecided_raises(calls, step, match):
  ctrl = Controller(make_condition("never"), decision_lag=10)  # Decides without losses.
  for _ in range(calls):
    ctrl.next_kind()
  with pytest.raises(ValueError, match=match) as exc_info:
    ctrl.observe(step, 1.0)
  error_line(exc_info)


def test_observe_twice_or_backwards_raises_and_bad_loss_raises():
  ctrl = Controller(make_condition("never"), decision_lag=10)
  for _ in range(3):
    ctrl.next_kind()
  ctrl.observe(0, 1.0)
  ctrl.observe(1, 1.0)
  for step in (1, 0):
    with pytest.raises(ValueError, match="expected batch 2 next"):
      ctrl.observe(step, 1.0)
  with pytest.raises(ValueError, match="loss must be a number or None"):
    ctrl.observe(2, "low")
  ctrl.observe(2, NAN)  # Non-finite losses are accepted.


# ------------------------------------------------------------------------- rules


def decide(ctrl, n):
  """Decides n batches of constant loss, observing at once; returns the decision log."""
  run(ctrl, [1.0] * n)
  return ctrl.drain_decisions()


def test_warmup_phase_and_cooldown_pattern():
  ctrl = Controller(make_condition("always"), phase_steps=3, warmup_steps=1,
                    cooldown_steps=2, decision_lag=0)
  log = decide(ctrl, 12)
  assert "".join("M" if d.kind == "motivated" else "B" for d in log) == "BMMMBBMMMBBM"
  assert [d.reason for d in log] == (
      ["warmup"] + ["condition", "phase", "phase", "cooldown", "cooldown"] * 2 + ["condition"])
  assert [d.score for d in log] == [0.0] + [1.0, 0.0, 0.0, 0.0, 0.0] * 2 + [1.0]
  assert ctrl.activations == 3 and ctrl.counts == {"base": 5, "motivated": 7}


def test_cooldown_follows_a_single_step_phase():
  ctrl = Controller(make_condition("always"), cooldown_steps=2)
  assert [d.kind[0] for d in decide(ctrl, 7)] == list("mbbmbbm")
  assert ctrl.activations == 3


def test_warmup_only_delays_the_condition():
  log = decide(Controller(make_condition("every_n", n=2), warmup_steps=4), 8)
  assert [d.step for d in log if d.kind == "motivated"] == [5, 7]
  assert [d.reason for d in log[:4]] == ["warmup"] * 4


def test_condition_is_not_evaluated_during_a_phase():
  ctrl = Controller(make_condition("replay", indices=[2, 3, 6]), phase_steps=2)
  log = decide(ctrl, 8)
  assert [d.step for d in log if d.kind == "motivated"] == [2, 3, 6, 7]
  assert [(d.reason, d.score) for d in log[2:4]] == [("condition", 1.0), ("phase", 0.0)]
  assert ctrl.activations == 2


@pytest.mark.parametrize("cap", [0.25, 0.1, 1 / 3])
def test_max_fraction_caps_the_motivated_batches_at_every_prefix(cap):
  ctrl = Controller(make_condition("always"), max_fraction=cap)
  log = decide(ctrl, 200)
  motivated = 0
  for t, d in enumerate(log):
    motivated += d.kind == "motivated"
    # "always" trains the motivated model whenever the cap allows it: exactly the cap.
    assert motivated == math.floor(cap * (t + 1) + 1e-9), (t, motivated)
    assert d.reason == ("condition" if d.kind == "motivated" else "max_fraction")
  assert ctrl.activations == ctrl.counts["motivated"] == math.floor(cap * 200 + 1e-9)


def test_max_fraction_cuts_a_phase_short_and_its_cooldown_follows():
  ctrl = Controller(make_condition("replay", indices=[3]), phase_steps=4, cooldown_steps=2,
                    max_fraction=0.5)
  log = decide(ctrl, 10)
  # Batch 3 starts a phase of 4: batches 3, 4 and 5 make 1 of 4, 2 of 5 and 3 of 6
  # batches motivated; batch 6 would make 4 of 7, over half: capped, so the phase
  # ends there and its cooldown of 2 follows.
  assert [(d.kind[0], d.reason) for d in log[3:10]] == [
      ("m", "condition"), ("m", "phase"), ("m", "phase"), ("b", "max_fraction"),
      ("b", "cooldown"), ("b", "cooldown"), ("b", "condition")]


@pytest.mark.parametrize("cap", [0, 0.0, -0.1, 1.5, NAN, True, "0.2"])
def test_max_fraction_outside_zero_to_one_is_refused(cap):
  with pytest.raises(ValueError, match=r"max_fraction must be a number in \(0, 1\]"):
    Controller(make_condition("always"), max_fraction=cap)


def test_a_checkpoint_without_max_fraction_resumes_uncapped_only():
  """Checkpoints written before the cap existed hold no max_fraction: they resume
  into an uncapped controller, and a capped one refuses them."""
  saved = Controller(make_condition("always")).state_dict()
  del saved["config"]["max_fraction"]
  Controller(make_condition("always")).load_state_dict(saved)
  with pytest.raises(ValueError, match="max_fraction is 0.5 here, None in the checkpoint"):
    Controller(make_condition("always"), max_fraction=0.5).load_state_dict(saved)


def test_loss_streak_is_fed_during_warmup():
  ctrl = Controller(make_condition("loss_streak", k=2), warmup_steps=3, decision_lag=0)
  assert run(ctrl, [5.0, 4.0, 3.0, 2.0]) == ["base", "base", "base", "motivated"]


def test_decision_log_has_one_entry_per_decision_and_drains():
  ctrl = Controller(make_condition("loss_streak", k=1), decision_lag=0)
  run(ctrl, [3.0, 2.0, 2.5])
  log = ctrl.drain_decisions()
  assert log == [Decision(0, "base", 0.0, "condition"), Decision(1, "base", 0.0, "condition"),
                 Decision(2, "motivated", 1.0, "condition")]
  assert log[2].to_dict() == {"step": 2, "kind": "motivated", "score": 1.0,
                              "reason": "condition"}
  assert ctrl.drain_decisions() == []
  ctrl.next_kind()
  assert [d.step for d in ctrl.drain_decisions()] == [3]
  with pytest.raises(AttributeError):
    log[0].kind = "motivated"  # Frozen.


# ------------------------------------------------------------------------- checkpoints


def make_resumable():
  return Controller(make_condition("loss_streak", k=2, ema=0.3), phase_steps=3,
                    warmup_steps=5, cooldown_steps=2, decision_lag=1)


def test_state_round_trip_mid_run_gives_identical_decisions():
  losses = noisy_losses(120, seed=3, nan_at={40, 77})
  reference = make_resumable()
  expected = run(reference, losses)
  expected_log = reference.drain_decisions()
  seen = {"phase": False, "cooldown": False, "nan_held": False}
  for split in range(len(losses) + 1):
    first = make_resumable()
    head = run(first, losses[:split])
    first.drain_decisions()
    text = json.dumps(first.state_dict())
    state = json.loads(text)
    seen["phase"] |= state["phase_remaining"] > 0
    seen["cooldown"] |= state["cooldown_remaining"] > 0
    seen["nan_held"] |= any(math.isnan(loss) for _, loss in state["held_losses"])
    resumed = make_resumable()
    resumed.load_state_dict(state)
    assert json.dumps(resumed.state_dict()) == text
    tail = []
    for t in range(split, len(losses)):
      tail.append(resumed.next_kind())
      resumed.observe(t, losses[t])
    assert head + tail == expected, split
    assert resumed.drain_decisions() == expected_log[split:]
    assert resumed.counts == reference.counts
    assert resumed.activations == reference.activations
  assert all(seen.values()), seen
  assert 0 < expected.count("motivated") < len(losses)


def test_state_dict_contents():
  ctrl = make_resumable()
  run(ctrl, [3.0, 2.0, 1.0])
  state = ctrl.state_dict()
  assert state["step"] == 3 and state["last_observed_step"] == 2
  assert state["held_losses"] == [[1, 2.0], [2, 1.0]]  # Loss 0 was fed; 1 and 2 not due yet.
  assert state["condition"] == {"smoothed": 3.0, "streak": 0}
  assert state["config"] == {"condition": "loss_streak",
                             "condition_params": {"k": 2, "margin": 0.0, "ema": 0.3},
                             "phase_steps": 3, "warmup_steps": 5, "cooldown_steps": 2,
                             "decision_lag": 1, "policy": "switch", "max_fraction": None}


@pytest.mark.parametrize("other, key", [
    (lambda: Controller(make_condition("loss_streak", k=2, ema=0.3), phase_steps=3,
                        warmup_steps=5, cooldown_steps=2, decision_lag=0), "decision_lag"),
    (lambda: Controller(make_condition("loss_streak", k=3, ema=0.3), phase_steps=3,
                        warmup_steps=5, cooldown_steps=2), "condition_params"),
    (lambda: Controller(make_condition("always"), phase_steps=3, warmup_steps=5,
                        cooldown_steps=2), "condition"),
    (lambda: Controller(make_condition("loss_streak", k=2, ema=0.3), phase_steps=3,
                        warmup_steps=5, cooldown_steps=2, policy="both"), "policy"),
])
def test_load_state_dict_with_a_different_config_raises(other, key):
  ctrl = make_resumable()
  run(ctrl, [1.0] * 4)
  state = json.loads(json.dumps(ctrl.state_dict()))
  target = other()
  with pytest.raises(ValueError, match="config differs") as exc_info:
    target.load_state_dict(state)
  assert f" {key} is " in error_line(exc_info)
  assert target.step == 0  # Nothing was restored.


def test_load_state_dict_with_a_missing_key_raises():
  state = make_resumable().state_dict()
  del state["held_losses"]
  with pytest.raises(ValueError, match="missing 'held_losses'"):
    make_resumable().load_state_dict(state)


# ------------------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs, culprit", [
    ({"phase_steps": 0}, "phase_steps"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"cooldown_steps": 1.5}, "cooldown_steps"),
    ({"decision_lag": -1}, "decision_lag"),
    ({"decision_lag": None}, "decision_lag"),
    ({"policy": "alternate"}, "policy"),
])
def test_bad_controller_settings_raise(kwargs, culprit):
  with pytest.raises(ValueError) as exc_info:
    Controller(make_condition("never"), **kwargs)
  assert error_line(exc_info).startswith(culprit)


def test_controller_needs_a_condition_object():
  with pytest.raises(ValueError, match="condition must be a Condition"):
    Controller("loss_streak")


FULL_CONFIG = dict(condition="loss_streak", loss_streak={"k": 2, "margin": 0.0, "ema": 0.5},
                   every_n={"n": 10}, random={"p": 0.1, "seed": 0}, replay={"indices": ()},
                   phase_steps=2, warmup_steps=1, cooldown_steps=3, decision_lag=0,
                   policy="both")


def test_from_config_uses_only_the_chosen_condition():
  ctrl = Controller.from_config(FULL_CONFIG)
  assert ctrl.config == {"condition": "loss_streak",
                         "condition_params": {"k": 2, "margin": 0.0, "ema": 0.5},
                         "phase_steps": 2, "warmup_steps": 1, "cooldown_steps": 3,
                         "decision_lag": 0, "policy": "both", "max_fraction": None}
  replay = Controller.from_config({**FULL_CONFIG, "condition": "replay",
                                   "replay": {"indices": [4, 2]}})
  assert replay.condition.indices == (2, 4)
  assert Controller.from_config({"condition": "never"}).config["condition_params"] == {}
  default = Controller.from_config({})
  assert default.config == Controller(make_condition("loss_streak")).config


def test_from_config_accepts_a_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({**FULL_CONFIG, "condition": "replay",
                                   "replay": {"indices": (1, 3)}})
  ctrl = Controller.from_config(cfg)
  assert ctrl.condition.indices == (1, 3)
  # Warmup 1, a phase of 2 from batch 1, then a cooldown of 3 hides the replay of batch 3.
  assert run(ctrl, [1.0] * 6) == ["base", "motivated", "motivated", "base", "base", "base"]


def test_from_config_errors_name_the_culprit():
  with pytest.raises(ValueError) as exc_info:
    Controller.from_config({**FULL_CONFIG, "phase_step": 2})
  message = error_line(exc_info)
  assert "'phase_step'" in message and "phase_steps" in message and "loss_streak" in message
  with pytest.raises(ValueError, match="'every_n' needs parameter 'n'"):
    Controller.from_config({"condition": "every_n"})
  with pytest.raises(ValueError, match="'loss_streak': k must be"):
    Controller.from_config({**FULL_CONFIG, "loss_streak": {"k": 0}})
  with pytest.raises(ValueError, match="unknown motivation condition 'streak'"):
    Controller.from_config({"condition": "streak"})


# ------------------------------------------------------------------------- isolation


def test_module_imports_neither_jax_nor_numpy_and_random_is_process_independent():
  script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("standalone_controller", {str(CONTROLLER_FILE)!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
condition = module.make_condition("random", p=0.3, seed=11)
print("jax" in sys.modules, "numpy" in sys.modules)
print("".join("1" if condition.evaluate(t)[0] else "0" for t in range(64)))
"""
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=env, cwd="/", check=True).stdout.split()
  assert out[:2] == ["False", "False"]
  condition = make_condition("random", p=0.3, seed=11)
  assert out[2] == "".join("1" if condition.evaluate(t)[0] else "0" for t in range(64))
