"""End to end in the docker sandbox: `python -m klong_jax.eval --config=configs/eval_tiny.py` with
the scripted teacher endpoint, 2 held-out bundled tasks x 2 seeds -> graded trees and reports."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.docker
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_tiny_in_docker_produces_report(image, teacher_url, tmp_path):
  out = tmp_path / "eval"
  cmd = [sys.executable, "-m", "klong_jax.eval", f"--config={REPO}/configs/eval_tiny.py",
         f"--server={teacher_url}", f"--out={out}", "--budget=90s"]
  res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=400)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["task_ids"]) == 2 and summary["seeds"] == [0, 1]
  assert summary["config"]["backend"] == "docker" and summary["config"]["budget_s"] == 90
  assert summary["missing_pairs"] == [] and summary["judge_failures"]["total"] == 0
  for t in summary["task_ids"]:
    for s in (0, 1):
      d = out / "runs" / t / f"seed{s}"
      r = json.loads((d / "result.json").read_text())
      tree = json.loads((d / "graded_tree.json").read_text())
      assert r["score"] == tree["score"] == 1.0, (t, s, r["reproduce"])  # perfect teacher
      assert r["reproduce"]["exit_code"] == 0  # re-run in a fresh container
      assert (d / "submission" / "reproduce.log").exists()
      assert (d / "submission" / "results" / "metrics.json").exists()
      assert [p["source"] for p in r["timeline"]][-1] == "final"
  assert summary["overall"] == {"mean": 1.0, "se": 0.0, "n": 2}
  md = (out / "report.md").read_text()
  page = (out / "report.html").read_text()
  for t in summary["task_ids"]:
    assert f"./runs/{t}/seed1/graded_tree.json" in md and t in page
  assert page.count("<svg") == 2
  assert f"report {out}/report.html" in res.stdout
