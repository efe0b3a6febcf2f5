"""``train_and_evaluate(config, workdir)``: wires data, model, steps and controller.

Three parts: ``setup`` (``run_setup``) builds a run (data, model, controller,
the two compiled steps) and its state, restored from the workdir's latest
checkpoint if there is one (``resuming``); ``train``, here, is the loop;
``summarize`` (``run_summary``) the numbers a user asks for. The loop is
DESIGN's path of one batch::

    kind = controller.next_kind()               # host, plain Python
    state, metrics = train_steps[kind](state, batch)  # one compiled program per kind
    pending.push(t, kind, metrics)              # read decision_lag batches late,
                                                # then controller.observe(loss)

Nothing else happens on the host per batch but logging, evaluation
(``evaluation``) and checkpoints (``saving``) at their intervals.
docs/choices.md explains the decision lag.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import tqdm

from motivation_jax import agreement, checkpoint, compilation, data, files, steps
from motivation_jax.errors import Preempted, TrainingError
from motivation_jax.evaluation import evaluate_and_log, evaluate_run, worse_than_guessing
from motivation_jax.metrics import finite_json
from motivation_jax.pending_metrics import PendingMetrics
from motivation_jax.resuming import SAFE_TO_CHANGE_ON_RESUME
from motivation_jax.run_checks import check_config, check_workdir
from motivation_jax.run_setup import Run, build, setup
from motivation_jax.run_summary import format_summary, summarize
from motivation_jax.saving import save

# What other code reaches as ``train.X`` (main.py, the experiments, tests,
# benchmarks, docs), each defined in the module imported above. The loop below
# looks up PendingMetrics, evaluate_and_log and save in this module, so a
# harness that replaces ``train.save`` (benchmarks/run.py's ``loop_only``)
# replaces what the loop calls; that is why the loop lives here.
__all__ = ["train_and_evaluate", "older_objects_frozen", "train", "setup", "Run", "build",
           "check_config", "check_workdir", "SAFE_TO_CHANGE_ON_RESUME", "PendingMetrics",
           "evaluate_and_log", "save", "summarize", "format_summary"]


class StopRequest:
  """SIGTERM and SIGINT as a request to stop at the next batch boundary.

  A single process catches both signals while it trains (``with``): the
  handler only notes the signal, and ``reached(step)``, asked once per batch,
  says to checkpoint that batch and stop. A second signal acts as it would
  without this (the handlers are given back at the first), so a run that
  hangs can still be stopped.

  In a multi-process run JAX's preemption service owns SIGTERM (it tells every
  process, and they agree on the batch to stop at): no Python handler replaces
  it; ``reached`` asks Orbax's ``reached_preemption`` at every batch instead,
  so all processes checkpoint the same batch.
  """

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self._multi_process = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    self.signal: signal.Signals | None = None

  def __enter__(self) -> "StopRequest":
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._note)
    return self

  def __exit__(self, *exc) -> None:
    self._give_back()

  def _note(self, signum: int, frame) -> None:
    self.signal = signal.Signals(signum)
    self._give_back()

  def _give_back(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """Whether to checkpoint batch ``step`` (batches done) and stop."""
    if self._multi_process and self.signal is None:
      if self._ckpt.manager.reached_preemption(step):  # the same answer on every process
        self.signal = signal.SIGTERM
    return self.signal is not None


def train(run: Run, state: steps.TrainState) -> tuple[steps.TrainState, dict[str, float]]:
  """Trains from ``run.first_step`` to the end; returns the state and the last
  evaluation (empty if no evaluation was due). Raises ``Preempted`` after
  checkpointing the batch at which a stop was requested (``StopRequest``)."""
  with StopRequest(run.ckpt) as stop:
    # The steps read and write the storage order (a permutation within the
    # split leaves, docs/sharding.md); the state goes in and out in logical order.
    start = time.perf_counter()
    state, eval_metrics = _train(run, run.order["storage"](state), stop)
    run.loop_time_s += time.perf_counter() - start
    return run.order["logical"](state), eval_metrics


def _train(run: Run, state: steps.TrainState, stop: StopRequest
           ) -> tuple[steps.TrainState, dict[str, float]]:
  config, controller = run.config, run.controller
  pending = PendingMetrics(controller, run.ckpt,
                           max_nonfinite_steps=config.max_nonfinite_steps)
  pending.resume_interval(run.log_interval)
  decisions = agreement.DecisionCheck(controller)  # the same on every process
  eval_metrics: dict[str, float] = {}
  bar = tqdm.tqdm(total=run.total_steps, initial=run.first_step, unit="batch",
                  disable=not (config.progress_bar and run.chief), dynamic_ncols=True)
  # grain's threads (or worker processes) prepare host batches ahead; the next
  # batches are copied to the devices while the current step runs.
  batches = data.prefetch_to_device(run.train_data.iterator(
      run.first_step, run.total_steps, threads=config.data_threads,
      workers=config.data_workers), run.put)
  # What every batch asks, looked up once (a ConfigDict attribute costs about a
  # µs, a tenth of the loop's own host work per batch; benchmarks/run.py).
  total, per_epoch = run.total_steps, run.schedule.period
  log_every = config.log_every_steps
  next_kind, push, train_steps = decisions.next_kind, pending.push, run.train_steps
  for t, batch in zip(range(run.first_step, total), batches):
    kind = next_kind(t)
    state, metrics = train_steps[kind](state, batch)
    push(t, kind, metrics)
    bar.update(1)
    step = t + 1
    if step % log_every == 0:
      log_training(run, step, pending.interval_means(), bar)
    stopping = stop.reached(step) and step < total
    if step % per_epoch and step != total and not stopping:
      continue  # evaluations and checkpoints fall on epoch (period) ends and the last batch
    evaluate_now = run.epoch_ends(step, run.schedule.eval_every) or step == total
    save_now = (run.epoch_ends(step, run.schedule.checkpoint_every)
                or step == total or stopping)
    if evaluate_now or save_now:
      decisions.flush()  # before waiting on this step's state
    if evaluate_now:
      eval_metrics = evaluate_and_log(run, state, step, bar)
    if save_now:
      save(run, state, pending, step)
    if stopping:
      bar.close()
      committed = run.ckpt.committed_step()
      raise Preempted(f"stopped by {stop.signal.name} after batch {step} of "
                      f"{run.total_steps}: checkpoint {committed} is in {run.ckpt.directory}; "
                      "the same command resumes from it", 128 + stop.signal.value)
  bar.close()
  return state, eval_metrics


def log_training(run: Run, step: int, means: dict[str, float], bar: tqdm.tqdm) -> None:
  means["motivated_fraction"] = run.controller.counts["motivated"] / step
  run.writer.write(step, means)
  bar.set_postfix({k.replace("/", "_"): f"{v:.3f}" for k, v in means.items()
                   if k.endswith("loss")})


_frozen_by_runs = 0  # runs inside ``older_objects_frozen`` now (threads of one process)
_frozen_lock = threading.Lock()


@contextlib.contextmanager
def older_objects_frozen():
  """The objects that exist when a run starts (the imported modules, a caller's
  data: 165-265 thousand in a quick start) left out of Python's garbage
  collections until it ends (``gc.freeze``, then ``gc.unfreeze``).

  Tracing and lowering a step make enough objects to set off full collections,
  and each full collection walks every tracked object: on the 2-core EPYC one
  took 0.3-0.45 s of a warm 8 s quick start, during the base step's lowering.
  Frozen, they are not walked; what the run makes is still collected as
  usual, and the frozen objects (any garbage among them too) go back to the
  oldest generation at the end. Left alone where the process already manages
  its collector: garbage collection disabled, or objects frozen by someone else."""
  global _frozen_by_runs
  with _frozen_lock:
    ours = _frozen_by_runs > 0 or (gc.isenabled() and gc.get_freeze_count() == 0)
    if ours:
      if _frozen_by_runs == 0:
        gc.freeze()
      _frozen_by_runs += 1
  try:
    yield
  finally:
    if ours:
      with _frozen_lock:
        _frozen_by_runs -= 1
        if _frozen_by_runs == 0:
          gc.unfreeze()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains both sub-networks and returns the summary (also in workdir/summary.json)."""
  with older_objects_frozen():  # the run's start-up is not slowed by walking them
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  start_time = time.time()
  # Before the first compile (motivation_jax.compilation): every program this
  # run compiles, or reads back from the cache, is counted in its summary.
  cache_dir = compilation.use_cache(config.get("compilation_cache_dir"))
  with compilation.CompileLog() as compiles:
    run, state = setup(config, workdir)  # takes the workdir's lease
    try:
      summary, worse = _train_and_summarize(run, state, start_time,
                                            compiled=lambda: compiles.summary(cache_dir))
    finally:  # the end, an error, SIGTERM or SIGINT (Preempted, KeyboardInterrupt)
      run.lease.release()
  if worse:  # not a success, whatever was written: a scheduler must see it
    raise TrainingError(f"the run ended, but {'; '.join(worse)}: training diverged; its "
                        f"summary and last checkpoint are in {workdir}; lower "
                        "config.learning_rate")
  return summary


def _train_and_summarize(run: Run, state: steps.TrainState, start_time: float, *,
                         compiled: Callable[[], dict] | None = None
                         ) -> tuple[dict[str, Any], list[str]]:
  """``train``, then the summary, written to workdir/summary.json while the
  run still holds its lease."""
  try:
    state, eval_metrics = train(run, state)
    if not eval_metrics:  # resumed at the end: nothing was trained or evaluated
      eval_metrics = evaluate_run(run, state, compare=True)
  except Exception as e:
    # Let a save in flight finish (Orbax would otherwise die with the
    # interpreter, with tracebacks), and close the writers; not when device
    # work that never finishes is in flight (the error's exit_at_once).
    if not getattr(e, "exit_at_once", False):
      try:
        run.close(release_lease=False)
      except Exception:  # the first error is the one to report
        pass
    raise
  run.close(release_lease=False)
  summary = summarize(run, eval_metrics, time.time() - start_time)
  if compiled is not None:
    summary["compilation"] = compiled()
  worse = worse_than_guessing(run, eval_metrics)
  if worse:
    summary["diverged"] = [w.split()[1] for w in worse]
  if run.chief:
    run.lease.check()
    written, bad = finite_json(summary)
    files.write_text(files.join(run.workdir, "summary.json"), json.dumps(
        {**written, **({"non_finite": bad} if bad else {})}, indent=2, allow_nan=False))
  return summary, worse
