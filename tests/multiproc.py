"""Two JAX processes on this machine joined over a loopback coordinator (multi-host tests)."""

from __future__ import annotations

import os
import subprocess
import sys

from klong_jax.launch.experiment import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_two(argv: list[str], **env: str | None) -> list[subprocess.Popen]:
  """`python argv` as processes 0 and 1 under the KLONG_* env (parallel/mesh.py reads it); each
  `env` item is set, or removed where None. Output is captured (stdout + stderr)."""
  port = free_port()
  procs = []
  for i in range(2):
    penv = dict(os.environ, KLONG_COORDINATOR=f"127.0.0.1:{port}", KLONG_NUM_PROCESSES="2",
                KLONG_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    for k, v in env.items():
      if v is None:
        penv.pop(k, None)
      else:
        penv[k] = v
    procs.append(subprocess.Popen([sys.executable, *argv], env=penv, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
  """Each process's output once all have exited 0 (any still running is killed; a failure's
  assertion carries its log tail)."""
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
    assert p.returncode == 0, f"process {i} failed (code {p.returncode}):\n{log[-4000:]}"
  return logs
