"""The fleet packages never import jax (CPU hosts install without it)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess


def test_fleet_imports_leave_jax_out():
  code = ("import sys\n"
          "import klong_jax.agent.scaffold, klong_jax.agent.policy_server, klong_jax.agent.tools\n"
          "import klong_jax.rollout.worker, klong_jax.sandbox.docker_backend\n"
          "import klong_jax.sandbox.local_backend, klong_jax.sandbox.image\n"
          "import klong_jax.rollout.gcs_stream, google.cloud.storage\n"
          "import klong_jax.grading, klong_jax.factory, klong_jax.tasks\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
          "assert not bad, bad\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
