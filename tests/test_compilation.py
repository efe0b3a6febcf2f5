"""The persistent compilation cache of a run (motivation_jax.compilation): which
directory, a second run that compiles nothing, and a bad directory."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from motivation_jax import compilation, train
from motivation_jax.errors import ConfigError

from conftest import ROOT, load_default_config, run_launcher

TINY = {"model.name": "mlp", "model.base": {"widths": (16,)},
        "model.motivated": {"widths": (32,)}, "num_epochs": 1}


def tiny_config(**overrides):
  config = load_default_config()
  config.progress_bar = False
  for key, value in {**TINY, **overrides}.items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return config


@pytest.fixture
def own_cache(monkeypatch):
  """This process as a command line sees it: no JAX_COMPILATION_CACHE_DIR, and
  JAX's cache directory (the suite's, from conftest) taken as one a run set, so
  the run's own setting applies; the suite's cache is given back afterwards."""
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.delenv(compilation.ENV, raising=False)
  monkeypatch.setattr(compilation, "_set_by_us", before)
  yield
  jax.config.update("jax_compilation_cache_dir", before)
  jax_cache.reset_cache()


def test_the_cache_directory_is_jax_s_own_setting_then_the_config_then_the_default():
  home = os.path.expanduser("~")
  xdg = {"XDG_CACHE_HOME": "/xdg"}
  assert compilation.cache_dir(None, environ={}) == f"{home}/.cache/motivation_jax/xla"
  assert compilation.cache_dir(None, environ=xdg) == "/xdg/motivation_jax/xla"
  assert compilation.cache_dir("", environ=xdg) is None  # off
  assert compilation.cache_dir("~/c", environ=xdg) == f"{home}/c"
  assert compilation.cache_dir("gs://b/c", environ=xdg) == "gs://b/c"
  # JAX's environment variable wins over everything, "" included; then a
  # jax.config setting the user made before the run.
  env = {**xdg, compilation.ENV: "/env"}
  for value in (None, "", "/mine"):
    assert compilation.cache_dir(value, environ=env, jax_value="/set") == "/env"
    assert compilation.cache_dir(value, environ=xdg, jax_value="/set") == "/set"
  with pytest.raises(ConfigError, match=r"^config.compilation_cache_dir must be a directory, "
                                        r"'' \(no cache\) or None"):
    compilation.cache_dir(3, environ={})


def test_an_unwritable_cache_directory_is_one_line_error_before_any_work(own_cache, tmp_path):
  (tmp_path / "file").write_text("")
  before = jax.config.jax_compilation_cache_dir
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(tiny_config(compilation_cache_dir=str(tmp_path / "file" / "xla")),
                             str(tmp_path / "run"))
  assert str(error.value) == (
      f"cannot write in config.compilation_cache_dir={tmp_path}/file/xla: a part of its path "
      "is a file, not a directory; give config.compilation_cache_dir a directory this "
      "process can write in, or '' for no compilation cache")
  assert not (tmp_path / "run").exists()  # nothing was started
  assert jax.config.jax_compilation_cache_dir == before  # nor the cache changed


def test_an_empty_directory_turns_the_cache_off(own_cache, tmp_path):
  assert compilation.use_cache("") is None
  assert jax.config.jax_compilation_cache_dir is None
  with compilation.CompileLog() as log:
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  assert (log.compiled, log.from_cache) == (1, 0)


def test_a_second_run_in_a_fresh_process_compiles_nothing(own_cache, tmp_path):
  """A run in this process fills a new cache; the same run in a new process,
  pointed at it by JAX's variable (which wins over its config's directory),
  compiles no program and reads every one back."""
  cache = tmp_path / "xla"
  jax.clear_caches()  # nothing this process compiled before may hide a program
  first = train.train_and_evaluate(tiny_config(compilation_cache_dir=str(cache)),
                                   str(tmp_path / "first"))["compilation"]
  assert first["cache_dir"] == str(cache) and first["from_cache"] == 0
  assert len(os.listdir(cache)) == first["compiled"]
  # Each program a run of an MLP pair compiles, once (docs/compilation.md lists
  # them and why each is there): no step kind twice, no eager conversion. (On
  # several devices Orbax slices each replicated array shape for its writers:
  # jit(slice), one per shape.)
  programs = {k: v for k, v in first["programs"].items() if k != "jit(slice)"}
  assert programs == {
      "jit(base_train_step)": 1, "jit(motivated_train_step)": 1,
      "jit(create_train_state)": 1, "jit(eval_step)": 2}, programs  # one per sub-network
  # (A save's checksums and finite check are summed on the host for a state this
  # small: checkpoint.HOST_CHECKSUM_BYTES.)
  status, out, err = run_launcher(
      [sys.executable, "-m", "motivation_jax.main",
       f"--config={os.path.join(ROOT, 'configs', 'default.py')}",
       f"--workdir={tmp_path / 'second'}", "--config.progress_bar=False",
       "--config.model.name=mlp", "--config.model.base={'widths': (16,)}",
       "--config.model.motivated={'widths': (32,)}", "--config.num_epochs=1",
       f"--config.compilation_cache_dir={tmp_path / 'unused'}"],
      timeout=120, env={compilation.ENV: str(cache)})
  assert status == 0, err[-3000:]
  second = json.loads((tmp_path / "second" / "summary.json").read_text())["compilation"]
  assert (second["compiled"], second["from_cache"]) == (0, first["compiled"]), second
  assert second["programs"] == first["programs"]
  assert not (tmp_path / "unused").exists()
  assert f"programs: 0 compiled (0.0 s), {first['compiled']} read from the cache" in out


@pytest.mark.parametrize("condition, never_picked", [("never", "motivated"),
                                                     ("always", "base")])
def test_a_run_compiles_no_step_its_condition_never_picks(tmp_path, condition, never_picked):
  """``never`` trains the base alone, ``always`` (no warm-up, cooldown or cap)
  the motivated model alone: the other step kind is neither traced nor compiled
  (``Controller.kinds``), its FLOPs are None and the summary says so; both
  sub-networks are still evaluated at the end."""
  with compilation.CompileLog() as log:  # a program read from the cache counts too
    summary = train.train_and_evaluate(
        tiny_config(**{"motivation.condition": condition}), str(tmp_path))
  picked = "base" if never_picked == "motivated" else "motivated"
  assert f"jit({never_picked}_train_step)" not in log.programs, log.programs
  assert log.programs.get(f"jit({picked}_train_step)") == 1, log.programs
  assert summary["flops_per_step"][never_picked] is None
  assert summary[f"{never_picked}_steps"] == 0 and summary[f"{picked}_steps"] > 0
  assert summary["training_flops"] == summary[f"{picked}_steps"] * summary["flops_per_step"][picked]
  assert {"base/test_accuracy", "motivated/test_accuracy"} <= set(summary)
  table = train.format_summary(summary)
  assert "not compiled" in table
  if never_picked == "motivated":
    assert summary["large_alone_flops"] is None
    assert "never picks its motivated step, which it did not compile" in table
  else:
    assert summary["large_alone_flops"] == summary["training_flops"]


def test_a_run_leaves_older_objects_out_of_garbage_collections_and_gives_them_back(
    tmp_path, monkeypatch):
  import gc
  assert gc.get_freeze_count() == 0 and gc.isenabled()  # as a fresh process starts
  seen = {}

  def setup(config, workdir):  # the run's first step: what the collector sees then
    seen["frozen"] = gc.get_freeze_count()
    raise RuntimeError("stop here")
  monkeypatch.setattr(train, "setup", setup)
  with pytest.raises(RuntimeError, match="stop here"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert seen["frozen"] > 1000  # the imported modules' objects, at least
  assert gc.get_freeze_count() == 0  # given back, after an error too

  # Overlapping runs (threads of one process) give them back when the last
  # ends. (An object freed while frozen leaves the count: it only falls.)
  with train.older_objects_frozen():
    first = gc.get_freeze_count()
    made = [[] for _ in range(10_000)]  # noqa: F841  (tracked objects, alive)
    with train.older_objects_frozen():
      assert 0 < gc.get_freeze_count() <= first  # not frozen again
    assert gc.get_freeze_count() > 0  # the first run still holds them
  assert gc.get_freeze_count() == 0


def test_a_process_that_manages_its_collector_is_left_alone():
  import gc
  gc.freeze()  # the caller's own: a run neither adds to it nor gives it back
  try:
    frozen = gc.get_freeze_count()
    made = [[] for _ in range(10_000)]  # noqa: F841
    with train.older_objects_frozen():
      assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() > 0
  finally:
    gc.unfreeze()
  gc.disable()
  try:
    with train.older_objects_frozen():
      assert gc.get_freeze_count() == 0
  finally:
    gc.enable()


def test_a_run_leaves_no_device_array_that_only_a_collection_would_free(tmp_path):
  # What makes freezing the older objects safe: a run's arrays are freed by
  # their reference counts, so the next run, frozen, holds no earlier state.
  import gc
  before = {id(a) for a in jax.live_arrays()}
  gc.disable()  # no collection during or after the run
  try:
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    left = [a for a in jax.live_arrays() if id(a) not in before]
  finally:
    gc.enable()
  assert not left, [a.shape for a in left]
