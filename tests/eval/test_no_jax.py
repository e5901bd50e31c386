"""The eval runs on JAX-free CPU hosts: importing it (and building a report) never loads jax."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess


def test_eval_imports_leave_jax_out():
  code = ("import sys\n"
          "import klong_jax.eval, klong_jax.eval.__main__, klong_jax.eval.pair\n"
          "from klong_jax.eval import plots\n"
          "plots._pyplot()\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
          "assert not bad, bad\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
