"""The long-horizon sweep suite: generated data, shape, and graded partial credit when cut."""

import filecmp
import json
import os
import time

import pytest

from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.data import tokenizer
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.rollout.worker import Worker, WorkerConfig
from klong_jax.tasks import list_tasks, load_task
from klong_jax.tasks import long_suite as ls


def test_long_suite_matches_generator(tmp_path):
  ls.build(str(tmp_path))
  ours = ls.suite_dir()
  assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(ours))
  for dirpath, _, names in os.walk(tmp_path):
    for f in names:
      rel = os.path.relpath(os.path.join(dirpath, f), tmp_path)
      assert filecmp.cmp(tmp_path / rel, os.path.join(ours, rel), shallow=False), (
          f"{rel} is stale: run python -m klong_jax.tasks.long_suite")


def test_long_suite_shape():
  root = ls.suite_dir()
  counts = {s: len(list_tasks(root, s)) for s in ("train", "rl", "heldout")}
  assert counts == {"train": 30, "rl": 20, "heldout": 10}
  t = load_task(os.path.join(root, "gd-sweep1"))
  runs = json.loads(t.files["submission/runs.json"])
  assert ls.MIN_RUNS <= len(runs) == t.config["runs"] <= ls.MAX_RUNS
  assert {"submission/run.py", "submission/solution.py"} <= set(t.files)
  assert len(list(t.rubric.leaves())) == len(runs) + 3
  # The number of settings varies, so when the sweep is complete must be read, not counted.
  sizes = {load_task(d).config["runs"] for d in list_tasks(root)}
  assert len(sizes) >= 5, sizes
  # No two tasks share a setting (train, RL and held-out runs are all different experiments).
  seen = [json.dumps(r, sort_keys=True) for d in list_tasks(root)
          for r in json.loads(load_task(d).files["submission/runs.json"])]
  assert len(seen) == len(set(seen))


class Slow:
  def __init__(self, policy, delay_s):
    self.policy, self.delay_s = policy, delay_s

  def __call__(self, messages, tools):
    time.sleep(self.delay_s)
    return self.policy(messages, tools)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return str(tokenizer.default_tokenizer(tmp_path_factory.mktemp("tok")).path)


def _rollout(tmp_path, tok_path, policy, **cfg):
  url, stop = serve_in_thread(policy)
  try:
    w = Worker(WorkerConfig.from_fields(
        server=url, tasks=ls.suite_dir(), stream=str(tmp_path / "s"),
                            tokenizer=tok_path, backend="local", context_tokens=3072,
                            context_overlap=256, max_completion_tokens=160,
                            reproduce_timeout_s=60, **cfg))
    return w.rollout(load_task(os.path.join(ls.suite_dir(), "arith-sweep1")), 0,
                     cfg.get("time_limit_s", 600))
  finally:
    stop()


N = 18  # Settings of arith-sweep1.


def test_sweep_teacher_scores_full_and_cut_rollouts_get_partial_credit(tmp_path, tok_path):
  assert load_task(os.path.join(ls.suite_dir(), "arith-sweep1")).config["runs"] == N
  full = _rollout(tmp_path / "a", tok_path, ScriptedTeacher(skill=1.0), max_steps=40)
  assert full["status"] == "completed" and full["reward"] == 1.0
  assert full["metadata"]["steps"] == N + 2  # N runs, reproduce.sh, submit
  # Step budget after 6 actions: 6 of N logged runs (4/6 of the weight * 6/N).
  cut = _rollout(tmp_path / "b", tok_path, ScriptedTeacher(skill=1.0), max_steps=6)
  assert cut["status"] == "step_limit" and cut["reward"] == pytest.approx(4 / 6 * 6 / N)
  # The time limit ends a slow agent part way: graded as it stands, told apart from steps.
  timed = _rollout(tmp_path / "c", tok_path, Slow(ScriptedTeacher(skill=1.0), 0.3),
                   max_steps=40, time_limit_s=1.5)
  assert timed["status"] == "agent_timeout" and timed["metadata"]["end_reason"] == "time_limit"
  assert 0.0 < timed["reward"] < 1.0


class Fixed(ScriptedTeacher):
  """The teacher with one mistake on every call."""

  def __init__(self, kind):
    super().__init__(skill=1.0)
    self.kind = kind

  def mistakes(self):
    return {self.kind}


class Once(Fixed):
  """The teacher with one mistake on its `at`-th call only."""

  def __init__(self, kind, at):
    super().__init__(kind)
    self.at, self.calls = at, 0

  def mistakes(self):
    self.calls += 1
    return {self.kind} if self.calls == self.at else set()


@pytest.mark.parametrize("kind", ["skip_run", "stop_early", "no_reproduce"])
def test_each_sweep_mistake_costs_score(tmp_path, tok_path, kind):
  r = _rollout(tmp_path, tok_path, Fixed(kind), max_steps=60)
  assert 0.0 < r["reward"] < 1.0, (kind, r["reward"])


def test_a_malformed_run_is_seen_in_the_usage_line_and_repeated(tmp_path, tok_path):
  r = _rollout(tmp_path, tok_path, Once("crash", at=5), max_steps=60)
  assert r["reward"] == 1.0 and r["metadata"]["steps"] == N + 3  # one extra (repeated) run
  tools = [m["content"] for m in r["messages"] if m["role"] == "tool"]
  assert any("usage: python3 run.py K" in str(t) for t in tools)
