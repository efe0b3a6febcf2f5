"""The arms of the comparison, run for each seed as ordinary workdirs of the main job.

| arm            | motivation config                  | answers                                  |
|----------------|------------------------------------|------------------------------------------|
| ``base_alone``   | condition ``never``                  | is the base better with motivation?      |
| ``motivated``    | the config's own                   | the scheme itself                        |
| ``large_alone``  | ``always``, policy ``switch``          | is the motivated model as good as the    |
|                |                                    | large one trained on every batch?        |
| ``random_rate``  | ``random``, p = the motivated arm's  | does *when* matter, at the same expected |
|                | firing rate (Experiment A)         | rate?                                    |
| ``random_times`` | ``replay`` of as many activations as | the same count, at other (uniformly      |
|                | the motivated arm had (Exp. B)     | drawn) batches                           |
| ``large_matched``| ``always``, policy ``switch``, for as  | with the same compute, would the large   |
|                | many batches as the motivated arm's| model alone be better?                   |
|                | FLOPs buy (``train_steps``)          |                                          |
| ``joint``        | ``always``, policy ``joint``           | is motivation better than the standard   |
|                | (MatFormer: both on every batch,   | way of training nested models?           |
|                | one update of the summed losses)   |                                          |

Everything else (data, model, optimizer, schedule, seed) is the config's, so
two arms of one seed differ only in which batches train the motivated model:
the batches, the initial weights and the augmentation are the same (each is a
function of the seed and the batch index).

``large_matched`` is derived from the ``motivated`` run of the same seed too:
it trains the large model alone for N = round(F / f) batches, F the motivated
run's training FLOPs (base and motivated steps), f the large model's FLOPs per
step, so that its FLOPs are within half a step of F; its learning-rate
schedule keeps its shape, compressed to N batches (``train_steps`` for image
runs; ``num_train_steps`` and a scaled ``warmup_steps`` for language models).

The random arms are derived from the ``motivated`` run of the same seed:
``random_rate`` fires with p = activations / batches where the condition was
consulted (with ``phase_steps=1`` and no warm-up or cooldown, the motivated
fraction); ``random_times`` replays ``activations`` batch indices drawn without
replacement from the batches after the warm-up. ``base_alone`` and
``large_alone`` drop ``max_fraction`` (and ``large_alone`` the warm-up and
cooldown), so that they are the two models trained alone.

Each run lives in ``DIR/<arm>-seed<seed>``. A run with a ``summary.json`` is
finished and reused; one without resumes from its latest checkpoint; so an
interrupted suite continues where it stopped. ``DIR/suite.json`` records the
config, and a suite refuses to continue in a directory of another config.

One suite per directory: the command holds the lease on ``DIR``
(``motivation_jax.lease``) while it runs and writes the report, and each arm's
run holds its own workdir's, as any run does; a second suite (or a run) on
either refuses in one line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import ml_collections
import numpy as np

from motivation_jax import config_lib, files, lease, train
from motivation_jax.errors import ConfigError

ARMS = ("base_alone", "motivated", "large_alone", "random_rate", "random_times",
        "large_matched", "joint")
# Arms whose config is derived from another arm's run of the same seed.
DERIVED_FROM = {"random_rate": "motivated", "random_times": "motivated",
                "large_matched": "motivated"}


def matched_steps(summary: dict) -> int:
  """Batches of the large model alone whose FLOPs are nearest a run's total
  (``summary.json``'s ``training_flops``): round(F / f), at least 1."""
  flops = summary["flops_per_step"]
  # Under "both" and "joint" the motivated step also trains the base.
  large = flops["motivated"] - (flops["base"] if summary.get("policy") in ("both", "joint")
                                else 0.0)
  return max(1, int(round(summary["training_flops"] / large)))


def check_arms(arms: Iterable[str]) -> tuple[str, ...]:
  """The requested arms in suite order, plus the runs they derive from."""
  arms = tuple(arms)
  unknown = [a for a in arms if a not in ARMS]
  if unknown or not arms:
    raise ConfigError(f"--arms must name some of {', '.join(ARMS)}; got {', '.join(arms) or 'none'}")
  needed = set(arms) | {DERIVED_FROM[a] for a in arms if a in DERIVED_FROM}
  return tuple(a for a in ARMS if a in needed)


def run_dir(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, f"{arm}-seed{seed}")


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int,
               source: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config of one arm and seed; ``source`` is the ``load_run`` record of
  the run a derived arm copies its rate or count from."""
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  config.seed = seed
  config.progress_bar = False
  m = config.motivation
  if arm == "base_alone":
    m.condition, m.max_fraction = "never", None
  elif arm in ("large_alone", "joint"):
    m.condition, m.max_fraction = "always", None
    m.policy = "joint" if arm == "joint" else "switch"
    m.warmup_steps = m.cooldown_steps = 0
  elif arm in DERIVED_FROM:
    if source is None:
      raise ValueError(f"arm {arm!r} needs the {DERIVED_FROM[arm]!r} run of seed {seed}")
    if arm == "large_matched":
      m.condition, m.policy, m.max_fraction = "always", "switch", None
      m.warmup_steps = m.cooldown_steps = 0
      steps = matched_steps(source["summary"])
      if config.get("task") == "causal_lm":
        if config.get("warmup_steps") is not None:
          config.warmup_steps = int(round(config.warmup_steps * steps / config.num_train_steps))
        config.num_train_steps = steps
      else:
        config.train_steps = steps
      return config
    decisions = source["decisions"]
    activations = source["summary"]["activations"]
    if arm == "random_rate":
      consulted = sum(d["reason"] == "condition" for d in decisions)
      m.condition = "random"
      m.random = {"p": activations / max(consulted, 1), "seed": seed}
    else:
      eligible = np.arange(m.warmup_steps, len(decisions))
      # Its own stream: the draw must not repeat the random arm's coin flips.
      rng = np.random.default_rng([seed, 0xB])
      chosen = rng.choice(eligible, size=min(activations, len(eligible)), replace=False)
      m.condition = "replay"
      m.replay = {"indices": tuple(int(i) for i in np.sort(chosen))}
  elif arm != "motivated":
    raise ConfigError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
  return config


def _jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def load_run(directory: str, arm: str, seed: int) -> dict[str, Any]:
  """A finished run as a record: its summary, its evaluations and its decisions.

  A run killed during a checkpoint and resumed can hold a batch's decision or
  an evaluation twice; the last line of each batch is kept.
  """
  with open(os.path.join(directory, "summary.json")) as f:
    summary = json.load(f)
  evals = {m["step"]: m for m in _jsonl(os.path.join(directory, "metrics.jsonl"))
           if "epoch" in m}
  decisions = {d["step"]: d for d in _jsonl(os.path.join(directory, "decisions.jsonl"))}
  return {"arm": arm, "seed": seed, "workdir": directory, "summary": summary,
          "evals": [evals[s] for s in sorted(evals)],
          "decisions": [decisions[s] for s in sorted(decisions)]}


def _suite_config(config: ml_collections.ConfigDict) -> dict:
  """What must match for runs to be reused: the config, less the seed (each
  run sets its own) and the progress bar."""
  d = json.loads(config.to_json())
  d.pop("seed", None)
  d.pop("progress_bar", None)
  d.pop("lease_ttl_s", None)  # how the runs guard their workdirs, not what they train
  d.pop("compilation_cache_dir", None)  # where compiled programs are kept, likewise
  return d


def make_local_workdir(workdir: str) -> str:
  """Makes the suite's directory, or refuses a URL."""
  if files.is_url(workdir):  # its plots and report are written with matplotlib and open()
    raise ConfigError(f"--workdir={workdir}: a suite needs a local directory (a single run's "
                      "--workdir of motivation_jax.main may be a gs:// URL)")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def hold(config: ml_collections.ConfigDict, workdir: str) -> lease.Lease:
  """The suite's lease on ``workdir`` (refuses a directory another suite holds)."""
  return lease.acquire(make_local_workdir(workdir), ttl_s=config.lease_ttl_s, what="suite")


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the suite's config in ``workdir/suite.json``, or refuses a workdir
  that holds a suite of another config."""
  make_local_workdir(workdir)
  path, mine = os.path.join(workdir, "suite.json"), _suite_config(config)
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)["config"]
    if theirs != mine:
      changed = sorted(_diff(theirs, mine))
      raise ConfigError(f"{workdir} holds a suite of another config (differs in "
                        f"{', '.join(changed[:5])}); pick a new --workdir or use its config")
    return
  with open(path, "w") as f:
    json.dump({"config": mine}, f, indent=2)


def _diff(a: dict, b: dict) -> list[str]:
  """Dotted keys where two config dicts differ (a key only one has counts)."""
  a, b = config_lib.flat(a), config_lib.flat(b)
  missing = object()
  return [k for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)]


def run_suite(config: ml_collections.ConfigDict, seeds: Sequence[int], workdir: str,
              arms: Sequence[str] = ARMS, *,
              train_fn: Callable[[ml_collections.ConfigDict, str], Any] = train.train_and_evaluate,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs (or reuses) every arm for every seed; returns the records of the
  requested arms (``load_run``), seed by seed in arm order. ``train_fn(config,
  workdir)`` trains one run."""
  requested, order = tuple(arms), check_arms(arms)
  check_workdir(config, workdir)
  records, total, done = [], len(seeds) * len(order), 0
  for seed in seeds:
    finished: dict[str, dict] = {}
    for arm in order:
      done += 1
      directory = run_dir(workdir, arm, seed)
      tag = f"[{done}/{total}] {arm}, seed {seed}"
      if not os.path.exists(os.path.join(directory, "summary.json")):
        source = finished.get(DERIVED_FROM.get(arm, ""))
        resuming = os.path.isdir(os.path.join(directory, "checkpoints"))
        log(f"{tag}: {'resuming' if resuming else 'training'} in {directory}")
        train_fn(arm_config(config, arm, seed, source), directory)
      finished[arm] = load_run(directory, arm, seed)
      s = finished[arm]["summary"]
      key = "test_bits_per_byte" if s.get("task") == "causal_lm" else "test_accuracy"
      log(f"{tag}: {key} base {s[f'base/{key}']:.4f}, motivated "
          f"{s[f'motivated/{key}']:.4f}, {s['motivated_steps']} motivated batches")
    records += [finished[a] for a in order if a in requested]
  return records
