"""The package's import graph: no circles, nothing imported late to dodge one."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import COSTLIEST_FILES, COSTLIEST_FILES_WITH_SLOW, ROOT

PACKAGE = os.path.join(ROOT, "motivation_jax")
# Imports of package modules inside a function, each with its reason (none may be
# there to dodge a circle).
LATE_IMPORTS = {
    # Flag errors are reported before JAX, which train imports, takes its seconds.
    ("motivation_jax.main", "motivation_jax.train"),
}


def _module_name(path):
  relative = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
  return ".".join(relative[:-1] if relative[-1] == "__init__" else relative)


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield _module_name(path), ast.parse(open(path).read(), path)


def _imported(node, known):
  """The package modules an import statement loads."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module:
    # ``from motivation_jax import nesting`` loads the module motivation_jax.nesting.
    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
             for a in node.names]
  else:
    return []
  return [n for n in names if n in known]


def _graph():
  modules = dict(_modules())
  top, late = {}, set()
  for name, tree in modules.items():
    top[name] = {m for node in tree.body for m in _imported(node, modules)}
    for function in ast.walk(tree):
      if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        late |= {(name, m) for node in ast.walk(function) for m in _imported(node, modules)}
  return top, late


def _is_package_of(package, module):
  return module.startswith(package + ".")


def _find_circle(edges):
  """A circle in the graph ``module -> modules it imports``, or None."""
  done, path = set(), []

  def visit(module):
    if module in path:
      return path[path.index(module):] + [module]
    if module in done:
      return None
    path.append(module)
    for dep in sorted(edges.get(module, ())):
      circle = visit(dep)
      if circle:
        return circle
    path.pop()
    done.add(module)
    return None

  for module in sorted(edges):
    circle = visit(module)
    if circle:
      return circle
  return None


def test_the_package_imports_form_no_circle():
  top, _ = _graph()
  # A package's __init__ importing its own submodules is how packages work; a
  # submodule reaching up into its package's __init__ would close a circle.
  edges = {m: {d for d in deps if not _is_package_of(m, d)} for m, deps in top.items()}
  assert _find_circle(edges) is None
  assert "motivation_jax.common" in edges["motivation_jax.nesting"]  # the graph is real
  assert "motivation_jax.nesting" not in edges["motivation_jax.models"]
  assert "motivation_jax.models" not in edges["motivation_jax.nesting"]


def test_the_circle_check_finds_a_circle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _find_circle(edges) == ["a", "b", "c", "a"]
  assert _find_circle({"a": {"b"}, "b": set()}) is None


def test_no_package_module_is_imported_inside_a_function_without_a_reason():
  _, late = _graph()
  assert late == LATE_IMPORTS


@pytest.mark.parametrize("first, second", [("nesting", "models"), ("models", "nesting")])
def test_nesting_and_models_import_in_either_order(first, second):
  code = f"import motivation_jax.{first}, motivation_jax.{second}"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_the_files_conftest_sends_first_exist():
  present = set(os.listdir(os.path.join(ROOT, "tests")))
  for order in (COSTLIEST_FILES, COSTLIEST_FILES_WITH_SLOW):
    assert set(order) <= present, set(order) - present
    assert len(set(order)) == len(order)
