"""README.md: the quick start, the embedding example (run as written), the config reference."""

import os
import re

import flax.traverse_util

from conftest import ROOT, load_default_config


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def _quick_start_commands() -> list[str]:
  section = _readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second():
  commands = _quick_start_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands), commands
  assert "motivation_jax.main --config=configs/default.py" in commands[0]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci_lines = [line.strip() for line in f]
  assert commands[1] in ci_lines


def test_the_embedding_example_runs_as_written():
  match = re.search(r"<!-- embedding-example -->\s*```python\n(.*?)```", _readme(), re.S)
  assert match, "README.md lost its embedding example"
  code = match.group(1)
  namespace = {"__name__": "readme_example"}
  exec(compile(code, "README.md:embedding-example", "exec"), namespace)
  # The example trained and deployed something: it must end with a real check.
  assert "assert" in code


def test_the_config_reference_lists_every_key_of_the_default_config():
  keys = flax.traverse_util.flatten_dict(load_default_config().to_dict(), sep=".")
  section = _readme().split("## Configuration", 1)[1].split("\n## ", 1)[0]
  documented = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", section, re.M))
  assert sorted(documented) == sorted(keys)
  for key, value in keys.items():  # the defaults the table gives are the config's
    assert documented[key] in (str(value), repr(value)), (key, documented[key], value)


def test_the_bring_your_own_model_example_runs_as_written():
  match = re.search(r"<!-- byom-example -->\s*```python\n(.*?)```", _readme(), re.S)
  assert match, "README.md lost its bring-your-own-model example"
  code = match.group(1)
  exec(compile(code, "README.md:byom-example", "exec"), {"__name__": "readme_byom"})
  assert "assert" in code
