"""BUILD covers the tree: each package module is in a py_library glob, each test has a py_test."""

import pathlib
import re

from dev import bazel_build

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _build_text() -> str:
  return (ROOT / "BUILD").read_text()


def test_every_module_in_a_library():
  text = _build_text()
  globs = set(re.findall(r'glob\(\["klong_jax/([a-z_]+)/\*\*/\*\.py"\]\)', text))
  missing = [p.relative_to(ROOT).as_posix() for p in (ROOT / "klong_jax").rglob("*.py")
             if p.parent != ROOT / "klong_jax" and p.relative_to(ROOT / "klong_jax").parts[0]
             not in globs]
  assert not missing, f"modules without a py_library target: {missing}; run " \
                      "`python -m dev.bazel_build`"


def test_every_test_file_has_a_target():
  srcs = set(re.findall(r'srcs = \["(tests/[^"]+\.py)"', _build_text()))
  missing = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
             if p.relative_to(ROOT).as_posix() not in srcs]
  assert not missing, f"tests without a py_test target: {missing}; run " \
                      "`python -m dev.bazel_build`"


def test_build_file_is_current():
  assert _build_text() == bazel_build.generate(), \
      "BUILD is stale: run `python -m dev.bazel_build`"
