"""Resumability: an eval SIGKILLed mid-run and restarted never re-runs a finished (task, seed)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.tasks import bundled_tasks_dir

pytestmark = pytest.mark.subprocess
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = bundled_tasks_dir()


class CountingPolicy:
  """Wraps a policy: counts episodes started (first turns) and slows every turn a little."""

  def __init__(self, inner, delay_s=0.0):
    self.inner, self.delay_s, self.episodes = inner, delay_s, 0
    self.lock = threading.Lock()

  def __call__(self, messages, tools=None):
    if not any(m.get("role") == "assistant" for m in messages):
      with self.lock:
        self.episodes += 1
    time.sleep(self.delay_s)
    return self.inner(messages, tools)


@pytest.fixture
def policy_url():
  policy = CountingPolicy(ScriptedTeacher(skill=1.0, seed=0), delay_s=0.25)
  url, stop = serve_in_thread(policy)
  yield policy, url
  stop()


def test_kill_and_restart_never_reruns_finished_pairs(tmp_path, policy_url):
  policy, url = policy_url
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "klong_jax.eval", f"--tasks={TASKS}", f"--server={url}",
         f"--out={out}", "--budget=60s", "--seeds=3", "--task_ids=arith-3", "--backend=local",
         "--max_steps=8", "--reproduce_timeout_s=30"]
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = out / "runs" / "arith-3" / "seed0" / "result.json"
  deadline = time.time() + 120
  while not first.exists():
    assert proc.poll() is None and time.time() < deadline, "eval never finished a pair"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = {s: (out / "runs/arith-3" / f"seed{s}" / "result.json").read_bytes()
          for s in range(3) if (out / "runs/arith-3" / f"seed{s}" / "result.json").exists()}
  assert 1 <= len(done) < 3, "kill should land with some pairs unfinished"
  before = policy.episodes
  res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
  assert res.returncode == 0, res.stderr[-3000:]
  assert policy.episodes - before == 3 - len(done)  # only unfinished pairs ran again
  for s, blob in done.items():
    assert (out / "runs/arith-3" / f"seed{s}" / "result.json").read_bytes() == blob
  leftovers = [d for d in os.listdir(out / "runs/arith-3") if d.startswith(".tmp-")]
  assert leftovers == []
  summary = json.loads((out / "summary.json").read_text())
  assert summary["missing_pairs"] == [] and summary["complete_seeds"] == [0, 1, 2]
  scores = [json.loads((out / "runs/arith-3" / f"seed{s}" / "result.json").read_text())["score"]
            for s in range(3)]
  assert summary["papers"]["arith-3"]["mean"] == pytest.approx(sum(scores) / 3)
  assert (out / "report.html").exists() and (out / "report.md").exists()
  # A third run finds everything finished and starts no episode.
  before = policy.episodes
  res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and policy.episodes == before, res.stderr[-2000:]
