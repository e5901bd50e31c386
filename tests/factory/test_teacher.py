"""Scripted teacher: solves bundled tasks through bash/submit tools; skill < 1 costs score."""

import json

import pytest

from klong_jax.factory.teacher import (
    MISTAKES,
    SWEEP_ONLY,
    ScriptedTeacher,
    find_paper,
    parse_rates,
)
from klong_jax.grading.grade import grade_submission
from klong_jax.rollout.episode import task_files
from klong_jax.sandbox.base import make_sandbox
from klong_jax.tasks import bundled_tasks_dir, list_tasks, load_task

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {a: {"type": "string"}}, "required": [a]}}}
    for n, a in (("bash", "cmd"), ("read_file_chunk", "file"), ("submit", "end_message"))]
SUB = "/workspace/submission"


def run_episode(teacher, task, paper_in_prompt=True):
  """A minimal tool loop (the real scaffold is tested elsewhere); returns (messages, grade)."""
  with make_sandbox("local") as sb:
    sb.put_files(task_files(task))  # paper/ and the starter submission/params.json
    user = "Reproduce the paper at /workspace/paper/paper.md; put code in " + SUB
    if paper_in_prompt:
      user += "\n\n" + task.paper_md
    msgs = [{"role": "system", "content": "agent"}, {"role": "user", "content": user}]
    for _ in range(6):
      a = teacher(msgs, TOOLS)
      msgs.append(a)
      call = a["tool_calls"][0]["function"]
      if call["name"] == "submit":
        break
      out = sb.exec(json.loads(call["arguments"])["cmd"], 30)
      msgs.append({"role": "tool", "tool_call_id": a["tool_calls"][0]["id"], "content": out.output})
    return msgs, grade_submission(task, sb, SUB, host_submission_dir=sb.root + "/submission")


def _tasks():
  return [load_task(d) for d in list_tasks(bundled_tasks_dir())]


def test_find_paper_reads_every_bundled_task():
  for t in _tasks():
    fam, params = find_paper([{"role": "user", "content": t.paper_md}])
    assert fam.name == t.config["family"] and params


@pytest.mark.parametrize("idx", [0, 13])
def test_perfect_teacher_scores_one(idx):
  task = _tasks()[idx]
  msgs, g = run_episode(ScriptedTeacher(1.0, seed=0), task, paper_in_prompt=idx != 13)
  assert g.score == 1.0, g.tree
  assert msgs[-1]["tool_calls"][0]["function"]["name"] == "submit"
  if idx == 13:  # paper not in the prompt: the teacher reads it first
    assert "cat /workspace/paper/paper.md" in msgs[2]["tool_calls"][0]["function"]["arguments"]


def test_each_mistake_costs_score():
  task = _tasks()[4]
  t = ScriptedTeacher(1.0, seed=0)
  fam, params = find_paper([{"role": "user", "content": task.paper_md}])
  for m in set(MISTAKES) - set(SWEEP_ONLY):
    t.mistakes = lambda m=m: {m}
    _, g = run_episode(t, task)
    assert 0.0 < g.score < 1.0, (m, g.score)


def test_low_skill_is_worse_on_average():
  tasks = _tasks()[:4]
  lo = ScriptedTeacher(0.2, seed=3)
  draws = [len(lo.mistakes()) for _ in range(200)]
  assert 0.6 < sum(draws) / 200 < 3.0
  assert sum(len(ScriptedTeacher(1.0, seed=1).mistakes()) for _ in range(50)) == 0
  scores = [run_episode(lo, t)[1].score for t in tasks]
  assert sum(scores) / len(scores) < 0.95
  with pytest.raises(ValueError, match="skill"):
    ScriptedTeacher(1.5)


def test_mistake_rates_override_chosen_kinds():
  t = ScriptedTeacher(1.0, seed=5, mistake_rates=parse_rates("wrong_fn=1, wrong_key=0.5"))
  draws = [t.mistakes() for _ in range(400)]
  assert all("wrong_fn" in d for d in draws)
  assert 150 < sum("wrong_key" in d for d in draws) < 250
  assert not any(d - {"wrong_fn", "wrong_key"} for d in draws)  # others keep skill 1.0's rate 0
  # Without overrides the draws are those of the skill alone (same rng sequence as before).
  a, b = ScriptedTeacher(0.6, seed=2), ScriptedTeacher(0.6, seed=2, mistake_rates={})
  assert [a.mistakes() for _ in range(50)] == [b.mistakes() for _ in range(50)]
  assert parse_rates("") == {}
  with pytest.raises(ValueError, match="unknown teacher mistake 'wrong_fm'.*wrong_fn"):
    ScriptedTeacher(1.0, mistake_rates={"wrong_fm": 0.3})
  with pytest.raises(ValueError, match="'crash' must be in"):
    ScriptedTeacher(1.0, mistake_rates={"crash": 1.5})
  with pytest.raises(ValueError, match="'wrong_fn' is not KIND=RATE"):
    parse_rates("wrong_fn")
  with pytest.raises(ValueError, match="not KIND=RATE"):
    parse_rates("wrong_fn=high")


def test_python_tool_only_and_no_tools():
  task = _tasks()[7]
  py_tools = [{"type": "function", "function": {"name": "python", "parameters": {
      "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
  msgs = [{"role": "user", "content": task.paper_md}]
  a = ScriptedTeacher(1.0)(msgs, py_tools)
  call = a["tool_calls"][0]["function"]
  code = json.loads(call["arguments"])["code"]
  assert call["name"] == "python" and "subprocess.run" in code and "solution.py" in code
  compile(code, "<teacher>", "exec")
  done = ScriptedTeacher(1.0)(msgs, None)
  assert "tool_calls" not in done and done["role"] == "assistant"


def test_thinking_teacher_adds_reasoning_and_acts_the_same():
  task = _tasks()[13]
  plain, _ = run_episode(ScriptedTeacher(0.5, seed=3), task, paper_in_prompt=False)
  thinking, _ = run_episode(ScriptedTeacher(0.5, seed=3, reasoning=True), task,
                            paper_in_prompt=False)
  strip = lambda ms: [(m["role"], m["content"], [c["function"] for c in m.get("tool_calls", [])])
                      for m in ms]
  assert strip(plain) == strip(thinking)  # Same actions and mistakes: reasoning is added only.
  turns = [m for m in thinking if m["role"] == "assistant"]
  assert len(turns) >= 3 and all(m["reasoning_content"] for m in turns)
  assert "paper.md" in turns[0]["reasoning_content"]
  assert not any("reasoning_content" in m for m in plain)
