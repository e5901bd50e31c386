"""The package layout holds: no import cycle between packages, and no fleet package reaches JAX.

Static (AST) checks over every module, counting imports inside functions too (a lazy import is
still an edge: calling that function on a fleet host would load it). The runtime twin, which
imports the fleet packages in a fresh interpreter, is tests/agent/test_no_jax.py.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "klong_jax"
# Packages the CPU rollout fleet runs (`pip install klong-jax` without the `train` extra).
FLEET = ("agent", "sandbox", "rollout", "grading", "tasks", "factory", "eval")
JAX_ROOTS = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorstore")


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every package module (bundled task data excluded)."""
  out = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    if {"data_long", "data"} & set(rel.parts[2:-1]) and rel.parts[1] == "tasks":
      continue
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    out[".".join(parts)] = path
  return out


MODULES = _modules()


@functools.cache
def _imports(path: pathlib.Path, name: str) -> frozenset[str]:
  """Absolute names a module imports anywhere in its body (relative imports resolved)."""
  found = set()
  pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + [base]).strip(".")
      found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
  return frozenset(found)


def _klong_deps(name: str) -> set[str]:
  """The package modules `name` imports (names that are not modules, e.g. functions, dropped)."""
  return {m for m in _imports(MODULES[name], name) if m in MODULES and m != name}


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and MODULES[module].name ==
                                        "__init__.py") else "<top>"


def test_no_package_cycle():
  graph: dict[str, set[str]] = {}
  for m in MODULES:
    src = _package(m)
    graph.setdefault(src, set()).update(
        d for d in map(_package, _klong_deps(m)) if d not in (src, "<top>"))
  # Depth-first search for a back edge; report the cycle's packages in order.
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(p: str) -> None:
    state[p] = 1
    stack.append(p)
    for q in sorted(graph.get(p, ())):
      if state.get(q) == 1:
        cycle = stack[stack.index(q):] + [q]
        pytest.fail(f"package import cycle: {' -> '.join(cycle)}; move the shared piece into "
                    "the lower package (see the layering in docs/architecture.md)")
      if q not in state:
        visit(q)
    stack.pop()
    state[p] = 2

  for p in sorted(graph):
    if p not in state:
      visit(p)


def test_fleet_packages_never_reach_jax():
  bad = []
  for start in (m for m in MODULES if _package(m) in FLEET):
    seen, todo = {start}, [start]
    while todo:
      m = todo.pop()
      heavy = sorted(i for i in _imports(MODULES[m], m) if i.split(".")[0] in JAX_ROOTS)
      if heavy:
        bad.append(f"{start} reaches {m}, which imports {heavy[0]}")
        break
      for d in _klong_deps(m) - seen:
        seen.add(d)
        todo.append(d)
  assert not bad, "fleet modules must stay JAX-free:\n" + "\n".join(sorted(bad))


def test_checks_can_fail(tmp_path, monkeypatch):
  """The cycle check fires on a planted cycle (so a pass above means something)."""
  fake = {"klong_jax.a.x": tmp_path / "x.py", "klong_jax.b.y": tmp_path / "y.py"}
  fake["klong_jax.a.x"].write_text("from klong_jax.b import y\n")
  fake["klong_jax.b.y"].write_text("import klong_jax.a.x\n")
  monkeypatch.setattr(__import__(__name__, fromlist=["MODULES"]), "MODULES", fake)
  with pytest.raises(pytest.fail.Exception, match="package import cycle: a -> b -> a"):
    test_no_package_cycle()
