"""Programmatic checks, grade_submission (mixed leaves, judge failures, blacklist) in a sandbox."""

import json
import os
import types

import pytest

from klong_jax.grading import checks
from klong_jax.grading.blacklist import find_violation, normalize
from klong_jax.grading.grade import grade_submission
from klong_jax.grading.rubric import rubric_from_dict
from klong_jax.sandbox.base import make_sandbox

SUB = "/workspace/submission"


@pytest.fixture(scope="module")
def sb():
  with make_sandbox("local") as s:
    s.put_files({
        "reproduce.sh": b"python3 run.py\n",
        "run.py": b"import json, os\nos.makedirs('results', exist_ok=True)\n"
                  b"json.dump({'acc': 0.91, 'loss': {'final': 2.5}}, open('results/m.json', 'w'))\n"
                  b"print('accuracy = 0.91')\n"}, dest=SUB)
    yield s


_REPRO = {}


def _repro(s):
  """reproduce.sh runs once per sandbox (the module shares one to keep the suite fast)."""
  if id(s) not in _REPRO:
    _REPRO[id(s)] = s.exec(f"cd {SUB} && bash reproduce.sh", 30)
  return _REPRO[id(s)]


@pytest.mark.parametrize("check,want", [
    ({"type": "file_exists", "path": "run.py"}, 1.0),
    ({"type": "file_exists", "path": "nope.py"}, 0.0),
    ({"type": "command", "cmd": "python3 -c 'import sys; sys.exit(3)'", "exit_code": 3}, 1.0),
    ({"type": "command", "cmd": "false"}, 0.0),
    ({"type": "command", "cmd": "sleep 5", "timeout_s": 0.5}, 0.0),
    ({"type": "regex", "file": "run.py", "pattern": r"json\.dump"}, 1.0),
    ({"type": "regex", "cmd": "python3 run.py", "pattern": r"accuracy = 0\.9\d"}, 1.0),
    ({"type": "regex", "source": "reproduce_log", "pattern": r"accuracy = 0\.91"}, 1.0),
    ({"type": "regex", "source": "reproduce_log", "pattern": r"accuracy = 0\.5"}, 0.0),
    ({"type": "numeric", "file": "results/m.json", "key": "acc", "expected": 0.9,
      "atol": 0.02}, 1.0),
    ({"type": "numeric", "file": "results/m.json", "key": "acc", "expected": 0.9,
      "atol": 0.005}, 0.0),
    ({"type": "numeric", "file": "results/m.json", "key": "loss.final", "expected": 2.0,
      "rtol": 0.3}, 1.0),
    ({"type": "numeric", "file": "results/m.json", "key": "missing", "expected": 1}, 0.0),
    ({"type": "numeric", "file": "results/none.json", "key": "acc", "expected": 1}, 0.0),
    ({"type": "numeric", "cmd": "python3 run.py", "pattern": r"accuracy = ([\d.]+)",
      "expected": 0.91}, 1.0),
    ({"type": "reproduce_ok"}, 1.0),
])
def test_checks(sb, check, want):
  repro = _repro(sb)
  score, expl = checks.run_check(check, sb, SUB, repro)
  assert score == want, expl


def test_bad_check_spec_named():
  with pytest.raises(checks.CheckError, match="'path'"):
    checks.validate_check({"type": "file_exists"})
  with pytest.raises(checks.CheckError, match="not in"):
    checks.validate_check({"type": "telepathy"})


def _task(rubric, blacklist=()):
  return types.SimpleNamespace(id="t", rubric=rubric_from_dict(rubric), blacklist=list(blacklist),
                               config={}, paper_md="paper", addendum_md="", judge_addendum_md="")


MIXED = {"id": "r", "requirements": "all", "weight": 1, "task_category": None, "sub_tasks": [
    {"id": "ok", "requirements": "reproduce ok", "weight": 1, "sub_tasks": [],
     "task_category": "Code Execution", "check": {"type": "reproduce_ok"}},
    {"id": "acc", "requirements": "acc 0.91", "weight": 2, "sub_tasks": [],
     "task_category": "Result Analysis",
     "check": {"type": "numeric", "file": "results/m.json", "key": "acc", "expected": 0.91}},
    {"id": "llm", "requirements": "code is clean", "weight": 1, "sub_tasks": [],
     "task_category": "Code Development"}]}


def test_grade_mixed_without_judge_marks_failure(sb):
  g = grade_submission(_task(MIXED), sb, SUB)  # runs reproduce.sh itself (reproduce_result None)
  assert g.reproduce["exit_code"] == 0
  assert g.judge_failures == 1  # the LLM leaf is flagged, not silently 0
  assert g.score == pytest.approx(3 / 4)
  assert g.category_scores["Code Development"] == 0.0
  assert g.disqualified is None


class FakeJudge:
  def __init__(self):
    self.calls = []

  def grade_leaves(self, task, rubric, leaves, submission_dir, reproduce_log, priority, code_dev):
    self.calls.append(([lf.id for lf in leaves], reproduce_log))
    return {lf.id: (1.0, True, "looks right", None) for lf in leaves}


def test_grade_mixed_with_judge(sb):
  judge = FakeJudge()
  g = grade_submission(_task(MIXED), sb, SUB, reproduce_result=_repro(sb), judge=judge)
  assert judge.calls == [(["llm"], "accuracy = 0.91\n")]
  assert g.score == 1.0 and g.judge_failures == 0
  cd = grade_submission(_task(MIXED), sb, SUB, judge=judge, code_dev=True)
  assert [lf.id for lf in cd.tree.leaves()] == ["llm"] and cd.reproduce is None


def test_blacklist_disqualifies(sb):
  bl = ["https://github.com/owner/paper-code"]
  task = _task(MIXED, bl)
  judge = FakeJudge()
  g = grade_submission(task, sb, SUB, judge=judge,
                       commands=["ls", "git clone https://github.com/owner/paper-code.git x"])
  assert g.score == 0.0 and "paper-code" in g.disqualified
  assert all("disqualified" in lf.explanation for lf in g.tree.leaves())
  ok = grade_submission(task, sb, SUB, judge=judge,
                        commands=["git clone https://github.com/owner/paper-code-other"])
  assert ok.disqualified is None and ok.score == 1.0


def test_blacklist_in_submission_files(tmp_path):
  (tmp_path / "reproduce.sh").write_text("wget http://www.github.com/Owner/Paper-Code/archive.zip\n")
  assert find_violation(["https://github.com/owner/paper-code"], [], str(tmp_path))
  (tmp_path / "reproduce.sh").write_text("# see github.com/owner/paper-code for the original\n")
  assert find_violation(["https://github.com/owner/paper-code"], [], str(tmp_path)) is None
  os.makedirs(tmp_path / ".git")
  git_cfg = '[remote "o"]\n url = git@github.com:owner/paper-code\n'
  (tmp_path / ".git" / "config").write_text(git_cfg)
  assert find_violation(["github.com/owner/paper-code/"], [], str(tmp_path))
  assert find_violation([], ["git clone https://github.com/owner/paper-code"], None) is None
  assert normalize("https://www.GitHub.com/a/b.git/") == "github.com/a/b"


def test_reproduce_result_object_accepted(sb, tmp_path):
  from klong_jax.grading.reproduce import ReproduceResult
  res = _repro(sb)
  rr = ReproduceResult(res, res.output, str(tmp_path), started_at=0.0)
  g = grade_submission(_task(MIXED), sb, SUB, reproduce_result=rr, judge=FakeJudge())
  assert g.score == 1.0 and json.dumps(g.to_dict())


def _leaf(lid, cat, check):
  return {"id": lid, "requirements": lid, "weight": 1, "sub_tasks": [], "task_category": cat,
          "check": check}


FRESH = {"id": "r", "requirements": "all", "weight": 1, "task_category": None, "sub_tasks": [
    _leaf("code", "Code Development", {"type": "file_exists", "path": "run.py"}),
    _leaf("acc", "Result Analysis",
          {"type": "numeric", "file": "results/m.json", "key": "acc", "expected": 0.91}),
    _leaf("written", "Code Execution",
          {"type": "file_exists", "path": "results/m.json", "fresh": True})]}
RUN = (b"import json, os, sys\nif len(sys.argv) > 1: sys.exit(1)\n"
       b"os.makedirs('results', exist_ok=True)\n"
       b"json.dump({'acc': 0.91}, open('results/m.json', 'w'))\n")
STALE = b'{"acc": 0.91}'  # What the agent's own run left in the submission.


@pytest.mark.parametrize("files,want", [
    ({"reproduce.sh": b"python3 run.py\n", "run.py": RUN, "results/m.json": STALE}, 1.0),
    # No reproduce.sh: the agent's own results/m.json is not a reproduced result (PaperBench
    # scores Result Analysis 0 when reproduce.sh touched no files).
    ({"run.py": RUN, "results/m.json": STALE}, 1 / 3),
    # reproduce.sh fails before writing: the stale file does not count either.
    ({"reproduce.sh": b"python3 run.py fail\n", "run.py": RUN, "results/m.json": STALE}, 1 / 3),
])
def test_result_leaves_count_only_files_the_reproduce_run_wrote(files, want):
  from klong_jax.grading.reproduce import ReproduceResult, run_reproduce_in
  with make_sandbox("local") as fresh:
    res, started = run_reproduce_in(fresh, files, 30)
    assert (started is None) == ("reproduce.sh" not in files)
    g = grade_submission(_task(FRESH), fresh, SUB,
                         reproduce_result=ReproduceResult(res, res.output, SUB, started))
  assert g.score == pytest.approx(want)
  expl = {lf.id: lf.explanation for lf in g.tree.leaves()}
  if want < 1:
    assert "did not run" in expl["acc"] or "not written by the reproduce run" in expl["acc"]
    assert "exists" not in expl["written"]
