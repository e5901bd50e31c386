"""Trainer + inference server + rollout worker as separate processes, docker sandboxes.

Checks that trajectories flow into training, policy versions advance (the server hot-reloads them
and stamps them on tokens), and staleness drops happen when forced (max_staleness=0, a new
version after every step, while the worker keeps rolling out on the old one).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from klong_jax.launch.experiment import free_port
from tests.conftest import skip_or_fail

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.subprocess]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def _metrics(run):
  path = os.path.join(run, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(x) for x in open(path) if '"loss"' in x]


def test_trainer_server_worker(tmp_path):
  try:
    from klong_jax.sandbox import image as image_lib
    image_lib.ensure_image()
  except Exception as e:  # noqa: BLE001
    skip_or_fail(f"docker sandbox image unavailable: {e}")
  from klong_jax.data.tokenizer import default_tokenizer
  tok = default_tokenizer(tmp_path / "tok", vocab_size=512)
  run, stream, port = str(tmp_path / "run"), str(tmp_path / "stream"), free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("trainer", "server", "worker")}
  procs = {}
  try:
    procs["trainer"] = subprocess.Popen(
        [PY, "-m", "klong_jax.rl.train", "--workdir", run, "--stream", stream,
         "--config=configs/rl_tiny.py:runlocal,steps=3,batch=1,row_len=3072,staleness=0,"
         "publish=1", "--config.rl.wait_timeout_s=400",
             # 24-token completions hit max_tokens on nearly every turn; "mask" would leave no
             # loss tokens (tests/rl/test_rl_trainer.py covers that case).
             "--config.rl.length_cut=train"],
        cwd=REPO, env=env, stdout=logs["trainer"], stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(run, "policy", "0")):  # version 0 first
      assert procs["trainer"].poll() is None and time.time() < deadline, "trainer died/hung"
      time.sleep(0.5)
    procs["server"] = subprocess.Popen(
        [PY, "-m", "klong_jax.inference.server", "--config=configs/serve_tiny.py",
         f"--policy_dir={run}/policy", f"--port={port}", "--max_len=3072", "--max_batch=2",
         "--config.serve.reload_interval_s=0.3", f"--config.serve.tokenizer={tok.path}"],
        cwd=REPO, env=env, stdout=logs["server"], stderr=subprocess.STDOUT)
    worker_code = (
        "from klong_jax.rollout.worker import WorkerConfig, run_fleet\n"
        f"run_fleet(WorkerConfig.from_fields(server='http://127.0.0.1:{port}/v1', "
        f"tasks='klong_jax/tasks/data', stream={stream!r}, tokenizer={tok.path!r}, "
        "group_size=2, rounds=20, "
        "worker='w', model='klong-tiny', max_steps=2, max_completion_tokens=24, "
        "context_tokens=3000, "
        "reproduce_timeout_s=20, tool_timeout_s=10, infra_retries=5, infra_backoff_s=1.0), 1)")
    procs["worker"] = subprocess.Popen([PY, "-c", worker_code], cwd=REPO, env=env,
                                       stdout=logs["worker"], stderr=subprocess.STDOUT)
    deadline = time.time() + 480
    while procs["trainer"].poll() is None:
      assert time.time() < deadline, "RL loop did not finish 3 steps in time"
      for name in ("server", "worker"):
        assert procs[name].poll() is None, f"{name} exited: see {tmp_path}/{name}.log"
      time.sleep(1.0)
    assert procs["trainer"].returncode == 0, (tmp_path / "trainer.log").read_text()[-3000:]
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.terminate()
    for p in procs.values():
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
    for f in logs.values():
      f.close()

  m = _metrics(run)
  assert [r["step"] for r in m] == [1, 2, 3]
  assert m[-1]["stream/trajectories_used"] >= 3  # trajectories flowed into training
  assert m[-1]["stream/dropped_stale"] > 0       # forced: the worker outran the versions
  versions = sorted(int(v) for v in os.listdir(os.path.join(run, "policy")) if v.isdigit())
  assert versions == [0, 1, 2, 3]
  # The server stamped its hot-reloaded versions on trained tokens: some step trained on v >= 1.
  assert max(r["policy_version"] - r["lag"] for r in m) >= 1
  consumed = [json.loads(x) for x in open(os.path.join(run, "consumed.jsonl"))]
  ids = [i for r in consumed for i in r["ids"]]
  assert len(ids) == len(set(ids)) and ids
