"""`make bench` driver: subprocess per script, caps, failures recorded, JSON + Markdown table."""

import json
import textwrap

import pytest

from benchmarks import run_all


def _script(body: str) -> str:
  return textwrap.dedent('''
      import json, sys, time
      out = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--out=")][0]
  ''') + textwrap.dedent(body)


@pytest.mark.subprocess
def test_runs_scripts_records_failures_and_writes_ratios(tmp_path):
  pkg = tmp_path / "fakebench"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "fast.py").write_text(_script('''
      json.dump({"summary": [
          {"metric": "new tok/s", "value": 300.0, "unit": "tok/s",
           "baseline": "old", "baseline_value": 100.0},
          {"metric": "latency", "value": 2.5, "unit": "s"}]}, open(out, "w"))
  '''))
  (pkg / "data.py").write_text(_script('''
      json.dump({"results": [{"workers": 0, "packed_tokens_per_s": 50.0},
                             {"workers": 2, "packed_tokens_per_s": 125.0}]}, open(out, "w"))
  '''))
  (pkg / "broken.py").write_text(_script('raise SystemExit(3)'))
  (pkg / "hang.py").write_text(_script('time.sleep(60)'))
  names = ["fast", "data", "broken", "hang"]
  json_path, md_path, runs = run_all.run_all(
      names, str(tmp_path / "results"), cap_s=30, every_s=0.5, caps={"hang": 1.5},
      package="fakebench", cwd=str(tmp_path))
  assert runs["fast"]["status"] == "ok" and runs["data"]["status"] == "ok"
  assert runs["broken"]["status"] == "failed (exit 3)"
  assert runs["hang"]["status"].startswith("timeout")
  report = json.load(open(json_path))
  rows = {(r["benchmark"], r["metric"]): r for r in report["summary"]}
  assert rows[("fast", "new tok/s")]["ratio"] == 3.0
  assert rows[("fast", "latency")]["ratio"] is None
  assert rows[("data", "packed tokens/s, 2 workers")]["ratio"] == 2.5
  md = open(md_path).read()
  assert "| fast | new tok/s | 300 | tok/s | old | 100 | 3x |" in md
  assert "| broken | failed (exit 3) |" in md


@pytest.mark.subprocess
def test_progress_lines_while_running(tmp_path):
  pkg = tmp_path / "slowbench"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "slow.py").write_text(_script('time.sleep(1.6); json.dump({"x": 1.0}, open(out, "w"))'))
  lines = []
  res = run_all.run_one("slow", str(tmp_path / "o.json"), 30, 0.4, "[1/1]", log=lines.append,
                        package="slowbench", cwd=str(tmp_path))
  assert res["status"] == "ok" and res["result"] == {"x": 1.0}
  assert any("running" in x for x in lines) and lines[-1].startswith("[1/1] slow: ok")
  assert run_all.rows_for("slow", res["result"])[0].value == 1.0


def test_discovers_the_repo_benchmarks():
  names = run_all.discover()
  assert "train_step" in names and "run_all" not in names and "__init__" not in names
