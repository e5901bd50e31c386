"""Every data file the package reads at run time ships in the wheel (setup.py package_data)."""

import ast
import fnmatch
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_data() -> list[str]:
  tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "package_data":
      return ast.literal_eval(node.value)["klong_jax"]
  raise AssertionError("setup.py has no package_data for klong_jax")


def test_every_data_file_is_package_data():
  globs = _package_data()
  pkg = os.path.join(ROOT, "klong_jax")
  missing = []
  for dirpath, dirnames, files in os.walk(pkg):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    for f in files:
      rel = os.path.relpath(os.path.join(dirpath, f), pkg)
      if f.endswith((".py", ".pyc")) or f.startswith("."):
        continue
      if not any(fnmatch.fnmatch(rel, g) for g in globs):
        missing.append(rel)
  assert not missing, (f"{len(missing)} data files not in setup.py package_data (a wheel install "
                       f"would lack them), e.g. {missing[:5]}: add a glob for their directory")
