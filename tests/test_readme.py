"""README.md and docs/: the quick start, every block that says it runs (run as
written), the config reference, and the links between the pages."""

import glob
import os
import re

import flax.traverse_util
import pytest

from conftest import ROOT, load_default_config

PAGES = sorted(["README.md", *(os.path.relpath(p, ROOT) for p in
                               glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))])
# A python block that claims to run follows this marker; the tests run each one.
RUNS = re.compile(r"<!-- runs: ([\w-]+) -->\s*```python\n(.*?)```", re.S)
# The blocks that must be there (a page that lost one fails, not skips).
EXPECTED_BLOCKS = {("README.md", "byom-example"), ("docs/own_loop.md", "embedding-example")}


def _read(page: str) -> str:
  with open(os.path.join(ROOT, page)) as f:
    return f.read()


def _quick_start_commands() -> list[str]:
  section = _read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second():
  commands = _quick_start_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands), commands
  assert "motivation_jax.main --config=configs/default.py" in commands[0]
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci_lines = [line.strip() for line in f]
  assert commands[1] in ci_lines


def test_the_readme_is_a_landing_page():
  # Issue 28: a page a newcomer reads in five minutes; the facts live in docs/.
  assert len(_read("README.md").splitlines()) <= 210


def _runnable_blocks():
  return [(page, name, code) for page in PAGES for name, code in RUNS.findall(_read(page))]


def test_the_expected_runnable_blocks_are_there():
  found = {(page, name) for page, name, _ in _runnable_blocks()}
  assert EXPECTED_BLOCKS <= found, EXPECTED_BLOCKS - found
  names = [name for _, name, _ in _runnable_blocks()]
  assert len(names) == len(set(names)), names


@pytest.mark.parametrize("page, name, code", _runnable_blocks(),
                         ids=[f"{p}:{n}" for p, n, _ in _runnable_blocks()])
def test_a_block_that_says_it_runs_runs_as_written(page, name, code):
  namespace = {"__name__": f"docs_{name.replace('-', '_')}"}
  exec(compile(code, f"{page}:{name}", "exec"), namespace)
  # The block trained or built something: it must end with a real check.
  assert "assert" in code


def test_the_config_reference_lists_every_key_of_the_default_config():
  keys = flax.traverse_util.flatten_dict(load_default_config().to_dict(), sep=".")
  section = _read("docs/running.md").split("## Configuration", 1)[1].split("\n## ", 1)[0]
  documented = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", section, re.M))
  assert sorted(documented) == sorted(keys)
  for key, value in keys.items():  # the defaults the table gives are the config's
    assert documented[key] in (str(value), repr(value)), (key, documented[key], value)


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to -."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: str) -> set[str]:
  text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
  return {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def _links():
  for page in PAGES:
    text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", _read(page), flags=re.S))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if not re.match(r"[a-z]+://", target):
        yield page, target


def test_every_link_between_the_pages_leads_somewhere():
  broken = []
  for page, target in _links():
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(os.path.join(ROOT, resolved)):
      broken.append(f"{page}: {target} (no such file)")
    elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
      broken.append(f"{page}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_the_link_check_finds_a_broken_link(tmp_path):
  assert _anchor("Bring your own model (`nesting.paired`, `config.model.module`)") == (
      "bring-your-own-model-nestingpaired-configmodelmodule")
  assert "no-such-heading" not in _anchors("README.md")
