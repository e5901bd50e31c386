"""Eval runner on the local backend with scripted endpoints: git commits graded at budget cuts
(score vs time), Code-Dev variant, settings/lock guard, infra failures, CLI errors."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from klong_jax.agent.policy_server import serve_in_thread
from klong_jax.eval import runner
from klong_jax.factory.teacher import ScriptedTeacher, find_paper
from klong_jax.tasks import bundled_tasks_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = bundled_tasks_dir()


class CommittingPolicy:
  """Commits a partial solution (no reproduce.sh), waits, then commits the full one and submits."""

  def __init__(self, wait_s):
    self.wait_s, self.teacher = wait_s, ScriptedTeacher(skill=1.0, seed=0)

  def __call__(self, messages, tools=None):
    n = sum(1 for m in messages if m.get("role") == "assistant")
    family, params = find_paper(messages)
    sub = "/workspace/submission"
    commit = (f"cd {sub} && git init -q 2>/dev/null; git add -A && git -c user.name=a "
              "-c user.email=a@b commit -qm step")
    steps = [self.teacher.solution_script(family, params, sub, {"no_reproduce"}) + "\n" + commit,
             f"sleep {self.wait_s}",
             self.teacher.solution_script(family, params, sub) + "\n" + commit]
    if n < len(steps):
      call = {"name": "bash", "arguments": json.dumps({"cmd": steps[n]})}
    else:
      call = {"name": "submit", "arguments": json.dumps({"end_message": "done"})}
    return {"role": "assistant", "content": f"step {n}",
            "tool_calls": [{"id": f"c{n}", "type": "function", "function": call}]}


@pytest.fixture
def serve():
  stops = []

  def start(policy):
    url, stop = serve_in_thread(policy)
    stops.append(stop)
    return url

  yield start
  for stop in stops:
    stop()


def _cfg(out, url, **kw):
  base = dict(tasks=TASKS, server=url, out=str(out), budget_s=60, seeds=1, task_ids=("arith-3",),
              backend="local", max_steps=8, reproduce_timeout_s=30, infra_backoff_s=0.1)
  return runner.EvalConfig.from_fields(**{**base, **kw})


def test_git_commits_are_graded_at_budget_cuts(tmp_path, serve):
  url = serve(CommittingPolicy(wait_s=9))
  # Budget 48 s -> cuts 4, 8, 16, 32, 48 s; commit 1 lands at ~1 s, commit 2 at ~10 s.
  summary = runner.run_eval(_cfg(tmp_path / "out", url, budget_s=48))
  r = json.loads((tmp_path / "out/runs/arith-3/seed0/result.json").read_text())
  assert len(r["commits"]) == 2 and r["end_reason"] == "submitted"
  first_sha = r["commits"][0]["sha"]
  tl = r["timeline"]
  assert [p["cut_s"] for p in tl] == [4, 8, 16, 32, 48]
  assert tl[0]["source"] == first_sha, tl
  assert tl[-1]["source"] == "final"
  partial = r["snapshots"][first_sha]["score"]
  assert 0 < partial < r["score"] == 1.0  # the early commit had no reproduce.sh
  assert tl[0]["score"] == partial and tl[-1]["score"] == r["score"]
  assert all(a["score"] <= b["score"] for a, b in zip(tl, tl[1:], strict=False))
  snap_tree = tmp_path / "out/runs/arith-3/seed0/snapshots" / first_sha / "graded_tree.json"
  assert json.loads(snap_tree.read_text())["score"] == partial
  assert summary["timeline"][0]["mean"] == partial


def test_code_dev_variant_grades_only_code_development(tmp_path, serve):
  url = serve(ScriptedTeacher(skill=1.0, seed=0))
  runner.run_eval(_cfg(tmp_path / "out", url, variant="code_dev"))
  r = json.loads((tmp_path / "out/runs/arith-3/seed0/result.json").read_text())
  assert r["reproduce"] is None  # Code-Dev never runs reproduce.sh
  assert r["category_scores"]["Code Execution"] is None
  assert r["category_scores"]["Result Analysis"] is None
  tree = json.loads((tmp_path / "out/runs/arith-3/seed0/graded_tree.json").read_text())

  def cats(d):
    return [d["task_category"]] if not d["sub_tasks"] else [c for s in d["sub_tasks"]
                                                            for c in cats(s)]
  assert set(cats(tree)) == {"Code Development"} and r["score"] == 1.0


def test_resume_with_other_settings_or_concurrently_is_refused(tmp_path, serve):
  url = serve(ScriptedTeacher(skill=1.0, seed=0))
  out = tmp_path / "out"
  runner.run_eval(_cfg(out, url))
  with pytest.raises(runner.EvalError, match=r"budget_s: 60(\.0)? -> 120"):
    runner.run_eval(_cfg(out, url, budget_s=120))
  with runner._Lock(str(out)), pytest.raises(runner.EvalError, match="another eval"):
    runner.run_eval(_cfg(out, url))


@pytest.mark.subprocess
def test_infra_failure_leaves_the_pair_unfinished_and_reported(tmp_path):
  out = tmp_path / "out"
  # Nothing listens on port 9.
  cfg = _cfg(out, "http://127.0.0.1:9/v1", infra_retries=1, request_retries=0)
  s = runner.run_eval(cfg)
  assert s["missing_pairs"] == [["arith-3", 0]] and s["overall"]["mean"] is None
  err = json.loads((out / "runs/arith-3/seed0.error.json").read_text())
  assert err["attempt"] == 2 and "rror" in err["error"]
  assert not (out / "runs/arith-3/seed0").exists()
  cmd = [sys.executable, "-m", "klong_jax.eval", f"--out={out}", "--report_only"]
  res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=60)
  assert res.returncode == 1 and "unfinished" in res.stderr, res.stderr[-2000:]
  assert "unfinished pairs" in (out / "report.md").read_text()


@pytest.mark.subprocess
def test_cli_rejects_bad_budget(tmp_path):
  cmd = [sys.executable, "-m", "klong_jax.eval", f"--tasks={TASKS}", "--server=http://x/v1",
         f"--out={tmp_path}", "--budget=soon"]
  res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=60)
  assert res.returncode != 0 and "budget 'soon' is not a duration" in res.stderr, (
      shlex.join(cmd), res.stderr[-1000:])


class SabotagingPolicy:
  """Solves the task, then makes its submission uncollectable (a 300 MB sparse file)."""

  def __init__(self):
    self.teacher, self.calls = ScriptedTeacher(skill=1.0, seed=0), 0

  def __call__(self, messages, tools=None):
    self.calls += 1
    n = sum(1 for m in messages if m.get("role") == "assistant")
    family, params = find_paper(messages)
    sub = "/workspace/submission"
    steps = [self.teacher.solution_script(family, params, sub), f"truncate -s 300M {sub}/big.bin"]
    call = ({"name": "bash", "arguments": json.dumps({"cmd": steps[n]})} if n < len(steps) else
            {"name": "submit", "arguments": json.dumps({"end_message": "done"})})
    return {"role": "assistant", "content": f"step {n}",
            "tool_calls": [{"id": f"c{n}", "type": "function", "function": call}]}


def test_uncollectable_submission_is_graded_empty_not_retried(tmp_path, serve):
  policy = SabotagingPolicy()
  url = serve(policy)
  runner.run_eval(_cfg(tmp_path / "out", url))
  r = json.loads((tmp_path / "out/runs/arith-3/seed0/result.json").read_text())
  assert policy.calls == 3  # One episode: the runner did not retry it as an infra failure.
  assert r["failure_reason"] == "submission_too_large" and "big.bin" in r["failure_detail"]
  assert r["score"] == 0.0 and r["end_reason"] == "submitted"
