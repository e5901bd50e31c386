"""Rollout diagnosis: teacher scripts with and without mistakes are classified as such."""

import json
import os

from klong_jax.data import shards
from klong_jax.eval import diagnose
from klong_jax.factory.teacher import ScriptedTeacher
from klong_jax.tasks.families import FAMILY_BY_FN
from tests.rl.fakes import make_trajectory


def _rollout(tid, reward, script, tool_output):
  t = make_trajectory(tid, tid + "-g", reward, version=0)
  t.task_id = tid
  t.messages = [
      {"role": "system", "content": "sys"},
      {"role": "assistant", "content": "solving", "tool_calls": [
          {"id": "c1", "type": "function",
           "function": {"name": "bash", "arguments": json.dumps({"cmd": script})}}]},
      {"role": "tool", "content": tool_output, "tool_call_id": "c1"}]
  return t


def test_classifies_teacher_mistakes_and_summarises(tmp_path):
  task = diagnose.bundled_task("arith-3")
  assert task is not None and diagnose.bundled_task("not-bundled") is None
  family, params = task
  assert family is FAMILY_BY_FN["arith_series"] and params == dict(a=7, d=-3, n=12)
  teacher = ScriptedTeacher(skill=1.0)
  good = teacher.solution_script(family, params, "/workspace/submission")
  renamed = teacher.solution_script(family, params, "/workspace/submission", {"wrong_fn"})
  crash = teacher.solution_script(family, params, "/workspace/submission", {"crash"})
  other = teacher.solution_script(family, params, "/workspace/submission", {"wrong_param"})
  key = teacher.solution_script(family, params, "/workspace/submission", {"wrong_key"})
  rows = [
      _rollout("arith-3", 1.0, good, '{"total": -114, "last": -26}'),
      _rollout("arith-3", 5 / 6, renamed, '{"total": -114, "last": -26}'),
      _rollout("arith-3", 1 / 3, crash, "SyntaxError: '(' was never closed\n[exit code 1]"),
      _rollout("arith-3", 0.5, other, '{"total": 120, "last": 21}'),
  ]
  tags = [diagnose.classify(t, task)["tags"] for t in rows]
  assert tags == [[], ["renamed_fn"], ["exec_error"], ["wrong_args"]]
  assert diagnose.classify(_rollout("arith-3", 2 / 3, key, '{"TOTAL": -114, "last": -26}'),
                           task)["tags"] == ["wrong_key"]
  no_repro = teacher.solution_script(family, params, "/workspace/submission", {"no_reproduce"})
  t = _rollout("arith-3", 0.25, no_repro, '{"total": -114, "last": -26}')
  t.messages.append({"role": "assistant", "content": "", "tool_calls": [  # Mentions it only.
      {"id": "c2", "type": "function", "function": {"name": "submit", "arguments": json.dumps(
          {"end_message": "The solution is written and reproduce.sh was run."})}}]})
  assert diagnose.classify(t, task)["tags"] == ["no_reproduce"]
  path = os.path.join(tmp_path, "stream", "0", "w.array_record")
  shards.write_shard(path, [t.to_bytes() for t in rows])
  d = diagnose.diagnose_dir(str(tmp_path / "stream"))
  assert d["n"] == 4 and abs(d["mean_reward"] - (1 + 5 / 6 + 1 / 3 + 0.5) / 4) < 1e-9
  assert d["histogram"] == {0.33: 1, 0.5: 1, 0.83: 1, 1.0: 1}
  assert d["tag_rate"]["wrong_args"] == 0.25 and d["tag_mean_reward"]["wrong_args"] == 0.5
  assert d["clean_rate"] == 0.25 and d["clean_mean_reward"] == 1.0
  assert d["rollouts"][0]["calls"] == ["arith_series(**json.load(open('params.json')))"]
  literal = _rollout("arith-3", 1.0, good.replace(d["rollouts"][0]["calls"][0],
                                                  "arith_series(a=7, d=-3, n=12)"), "{}")
  assert diagnose.classify(literal, task)["tags"] == []  # Retyping the constants right is fine.
