"""``save``: the loop's checkpoint of one batch, written after the decisions
and metrics up to that batch, so that a run killed at any moment resumes
without a doubled or a missing log line. (Orbax's part is ``checkpoint``; the
other way, restoring, is ``resuming``.)
"""

from __future__ import annotations

import json

from motivation_jax import checkpoint, files, steps
from motivation_jax.errors import TrainingError
from motivation_jax.pending_metrics import PendingMetrics
from motivation_jax.run_setup import Run


def save(run: Run, state: steps.TrainState, pending: PendingMetrics, step: int) -> None:
  """Checkpoints batch ``step``, after the decisions up to it are in decisions.jsonl
  and the metrics up to it on disk.

  Those lines are written before the checkpoint commits: if the process dies
  during the save, the next start resumes from the previous checkpoint and
  first cuts the logs back to it (``setup``), so no line is ever doubled.

  A state that is not finite (an update whose gradient was finite overflowed;
  the steps skip only what they can see before updating) is never saved:
  the run stops there, and the checkpoints before it stay the newest.

  ``state`` in either order: the checkpoint holds logical order, so that any
  mesh resumes it (a copy of the split leaves while it is written).
  """
  pending.flush()
  if run.lease is not None:
    run.lease.check()  # another run took the workdir over: write nothing more
  state = run.order["logical"](state)
  eval_stats = run.eval_stats(state)
  checksums, finite = checkpoint.array_checksums_and_finite(
      checkpoint.saved_arrays(state, eval_stats),
      finite_of=(state.params, state.batch_stats, state.opt_state))
  if not finite:
    last = run.ckpt.committed_step()
    kept = (f"the checkpoint of batch {last} in {run.ckpt.directory} is intact"
            if last is not None else "no checkpoint had been written yet")
    raise TrainingError(f"the parameters or optimizer state are not finite at batch {step} "
                        f"(an update overflowed), so they were not checkpointed; {kept}; "
                        "lower config.learning_rate")
  decisions = run.controller.drain_decisions()
  if run.chief:
    lines = []
    for d in decisions:
      loss = pending.losses.pop(d.step)
      lines.append(json.dumps({**d.to_dict(), "loss": loss,
                               **({"nonfinite": True} if loss is None else {})}) + "\n")
    files.append_lines(files.join(run.workdir, "decisions.jsonl"), lines)
  run.writer.flush()
  run.ckpt.save(step, state=state, controller_state=run.controller.state_dict(),
                data_position=run.train_data.position(step),
                config=json.loads(run.config.to_json()), dataset=run.dataset.description(),
                eval_stats=eval_stats, log_interval=pending.interval(),
                array_checksums=checksums)
