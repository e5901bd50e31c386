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
  assert len(runs) == ls.NUM_RUNS == t.config["runs"] and "run.py" in str(t.files)
  assert len(list(t.rubric.leaves())) == 2 + ls.NUM_RUNS + 3
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
    w = Worker(WorkerConfig(server=url, tasks=ls.suite_dir(), stream=str(tmp_path / "s"),
                            tokenizer=tok_path, backend="local", context_tokens=3072,
                            context_overlap=256, max_completion_tokens=160,
                            reproduce_timeout_s=60, **cfg))
    return w.rollout(load_task(os.path.join(ls.suite_dir(), "arith-sweep1")), 0,
                     cfg.get("time_limit_s", 600))
  finally:
    stop()


def test_sweep_teacher_scores_full_and_cut_rollouts_get_partial_credit(tmp_path, tok_path):
  full = _rollout(tmp_path / "a", tok_path, ScriptedTeacher(skill=1.0), max_steps=40)
  assert full["status"] == "completed" and full["reward"] == 1.0
  assert full["metadata"]["steps"] == ls.NUM_RUNS + 2
  # Step budget after 6 actions (the first also runs setting 1): the method (2/8) + 6 of 16
  # logged runs (4/8 * 6/16).
  cut = _rollout(tmp_path / "b", tok_path, ScriptedTeacher(skill=1.0), max_steps=6)
  assert cut["status"] == "step_limit" and cut["reward"] == pytest.approx(0.25 + 0.5 * 6 / 16)
  # The time limit ends a slow agent part way: graded as it stands, told apart from steps.
  timed = _rollout(tmp_path / "c", tok_path, Slow(ScriptedTeacher(skill=1.0), 0.3),
                   max_steps=40, time_limit_s=1.5)
  assert timed["status"] == "agent_timeout" and timed["metadata"]["end_reason"] == "time_limit"
  assert 0.25 < timed["reward"] < 1.0


class Fixed(ScriptedTeacher):
  """The teacher with one mistake on every call."""

  def __init__(self, kind):
    super().__init__(skill=1.0)
    self.kind = kind

  def mistakes(self):
    return {self.kind}


@pytest.mark.parametrize("kind", ["wrong_fn", "wrong_key", "skip_run", "stop_early",
                                  "no_reproduce", "crash"])
def test_each_sweep_mistake_costs_score_except_a_repaired_crash(tmp_path, tok_path, kind):
  r = _rollout(tmp_path, tok_path, Fixed(kind), max_steps=40)
  if kind == "crash":  # the traceback is seen in the next output and the method rewritten
    assert r["reward"] == 1.0 and r["metadata"]["steps"] == ls.NUM_RUNS + 3
  else:
    assert 0.0 < r["reward"] < 1.0, (kind, r["reward"])
