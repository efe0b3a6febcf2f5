"""Bad input at the command line: one ``error:`` line, exit status 2 (issue 13).

Each case is a command a user could type (``motivation_jax.main`` or
``motivation_jax.export``) and the one line it must print; docs/reliability.md
has the same table. They fail before any training, so each costs one
interpreter start.
"""

import errno
import os
import re
import subprocess
import sys

import pytest

from motivation_jax.files import writable_directory
from motivation_jax.errors import ConfigError

from conftest import ROOT

MAIN = [sys.executable, "-m", "motivation_jax.main"]
EXPORT = [sys.executable, "-m", "motivation_jax.export"]
DEFAULT = "--config=configs/default.py"


def _files(tmp):
  """A plain file, a config file with a syntax error, one that raises."""
  (tmp / "a_file").write_text("not a directory")
  (tmp / "syntax.py").write_text("def get_config(:\n")
  (tmp / "raises.py").write_text(
      "def get_config():\n  raise RuntimeError(\"the data isn't where it's said to be\")\n")
  (tmp / "has_file").mkdir()
  (tmp / "has_file" / "checkpoints").write_text("not a folder")  # found only at the first save
  (tmp / "has_folder" / "decisions.jsonl").mkdir(parents=True)


# (name, command, the one line it prints: a regex); {tmp} is the test's directory.
CASES = [
    ("workdir is a file", [*MAIN, DEFAULT, "--workdir={tmp}/a_file"],
     r"error: cannot write in workdir={tmp}/a_file: it is a file, not a directory"),
    ("empty workdir", [*MAIN, DEFAULT, "--workdir="],
     r"error: workdir is empty; give a directory"),
    ("workdir under a file", [*MAIN, DEFAULT, "--workdir={tmp}/a_file/run"],
     r"error: cannot write in workdir={tmp}/a_file/run: a part of its path is a file, not a "
     r"directory"),
    ("config with a syntax error", [*MAIN, "--config={tmp}/syntax.py", "--workdir={tmp}/w"],
     r"error: cannot load --config: SyntaxError: invalid syntax \(syntax.py, line 1\)"),
    ("config with a syntax error and an override",
     [*MAIN, "--config={tmp}/syntax.py", "--config.seed=1", "--workdir={tmp}/w"],
     r"error: cannot load --config: SyntaxError: invalid syntax \(syntax.py, line 1\)"),
    ("config that raises (apostrophes kept)", [*MAIN, "--config={tmp}/raises.py",
                                               "--workdir={tmp}/w"],
     r"error: cannot load --config: RuntimeError: the data isn't where it's said to be"),
    ("a value with an apostrophe", [*MAIN, DEFAULT, "--workdir={tmp}/w",
                                    "--config.model.name=it's"],
     r"error: config.model: unknown model \"it's\"; known: cnn, efficientnet, mlp, resnet, transformer, vit"),
    ("a variant of a config that has none",
     [*MAIN, "--config=configs/default.py:smoke", "--workdir={tmp}/w"],
     r"error: bad command line: configs/default.py has no variants \(its get_config\(\) "
     r"takes no argument\); drop ':smoke' from --config"),
    ("missing config file with an override",
     [*MAIN, "--config=configs/missing.py", "--config.seed=1", "--workdir={tmp}/w"],
     r"error: bad command line: .*No such file or directory: 'configs/missing.py'"),
    # TFDS logs a warning of its own first, unless --verbosity asks for it.
    ("a data set that is not there", [*MAIN, DEFAULT, "--workdir={tmp}/w",
                                      "--config.dataset=cifar10", "--config.data_dir={tmp}/tfds"],
     r"error: data set 'cifar10' is not prepared in {tmp}/tfds \(\w+\); prepare it where "
     r"there is network with `tfds build cifar10 --file_format=array_record` and point "
     r"--config.data_dir at that directory"),
    ("no --workdir", [*MAIN, DEFAULT],
     r"error: bad command line: flag --workdir=None: Flag --workdir must have a value other "
     r"than None."),
    ("checkpoints is a file", [*MAIN, DEFAULT, "--workdir={tmp}/has_file"],
     r"error: {tmp}/has_file/checkpoints is a file, not a folder: a run writes one there; "
     r"move it away or pick another --workdir"),
    ("decisions.jsonl is a folder", [*MAIN, DEFAULT, "--workdir={tmp}/has_folder"],
     r"error: {tmp}/has_folder/decisions.jsonl is a folder, not a file: a run writes one "
     r"there; move it away or pick another --workdir"),
    ("export --out is a file", [*EXPORT, "--workdir={tmp}/w", "--subnet=base",
                                "--out={tmp}/a_file"],
     r"error: cannot write in --out={tmp}/a_file: it is a file, not a directory"),
    ("export empty --out", [*EXPORT, "--workdir={tmp}/w", "--subnet=base", "--out="],
     r"error: --out is empty; give a directory"),
    ("export empty --workdir", [*EXPORT, "--workdir=", "--subnet=base", "--out={tmp}/o"],
     r"error: --workdir is empty; give the training run's --workdir"),
    ("export unknown --subnet", [*EXPORT, "--workdir={tmp}/w", "--subnet=medium",
                                 "--out={tmp}/o"],
     r"error: bad command line: flag --subnet=medium: value should be one of <base\|motivated>"),
    ("export without a run", [*EXPORT, "--workdir={tmp}/w", "--subnet=base", "--out={tmp}/o"],
     r"error: no checkpoints in {tmp}/w/checkpoints; train first with python -m "
     r"motivation_jax.main --workdir={tmp}/w \.\.\."),
]


@pytest.mark.parametrize("name, command, line", CASES, ids=[c[0].replace(" ", "_") for c in CASES])
def test_bad_input_gets_one_error_line_and_status_2(tmp_path, name, command, line):
  _files(tmp_path)
  command = [c.format(tmp=tmp_path) for c in command]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.count("\n") == 1, result.stderr[-2000:]  # nothing else, no traceback
  pattern = line.replace("{tmp}", re.escape(str(tmp_path)))
  assert re.fullmatch(pattern, result.stderr.strip()), result.stderr


def test_a_read_only_workdir_is_refused_in_one_line(tmp_path, monkeypatch):
  """A read-only file system answers only a write, whatever the permission bits
  say (root ignores them), so the check writes a file; the write is refused
  here as a read-only mount refuses it."""
  import builtins
  real_open = builtins.open

  def read_only(path, mode="r", *args, **kwargs):
    if "w" in mode and str(path).startswith(str(tmp_path / "ro")):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", read_only)
  with pytest.raises(ConfigError, match=rf"^cannot write in workdir={tmp_path}/ro: Read-only "
                     r"file system$"):
    writable_directory(str(tmp_path / "ro"), "workdir")
  assert writable_directory(str(tmp_path / "rw" / "deep"), "workdir")  # made, parents too
  assert os.listdir(tmp_path / "rw" / "deep") == []  # the probe is gone


def test_a_folder_whose_only_object_vanishes_between_two_looks_is_not_called_a_file(
    tmp_path, monkeypatch):
  # On a bucket the checkpoint folder is only the objects under it: another
  # process's write test puts one there and deletes it, so "it exists" and then
  # "it is not a folder" can both be seen; only an object of that very name is
  # a file where the folder goes.
  from motivation_jax import files, run_checks
  monkeypatch.setattr(files, "exists", lambda p: True)
  monkeypatch.setattr(files, "is_dir", lambda p: p.endswith("tensorboard"))
  run_checks.check_workdir(str(tmp_path / "run"))  # nothing is a file: not refused
  monkeypatch.undo()
  (tmp_path / "run" / "tensorboard").write_text("a file")  # and a real file still is
  with pytest.raises(ConfigError, match=r"tensorboard is a file, not a folder"):
    run_checks.check_workdir(str(tmp_path / "run"))
