"""Reports from finished pairs on disk: summary.json, Markdown and self-contained HTML with the
per-paper table, tree links, category and time charts, warnings, and a two-run comparison."""

import json
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
from PIL import Image

from klong_jax.eval import report, runner

CATS = ("Code Development", "Code Execution", "Result Analysis")


def _write_run(out, scores, budget_s=120.0, model="m", judge_failures=None):
  """Writes result.json files as the runner would; scores = {task: {seed: score}}."""
  judge_failures = judge_failures or {}
  for t, per_seed in scores.items():
    for s, v in per_seed.items():
      d = os.path.join(runner.pair_dir(str(out), t, s))
      os.makedirs(d)
      tl = [{"cut_s": c, "score": v * f, "source": "final"} for c, f in
            ((10.0, 0.5), (20.0, 0.75), (budget_s, 1.0))]
      rec = {"task_id": t, "seed": s, "score": v, "status": "completed", "n_leaves": 4,
             "judge_failures": judge_failures.get((t, s), 0), "category_scores": dict.fromkeys(
                 CATS, v), "timeline": tl, "disqualified": None, "grading_failed": False}
      with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(rec, f)
  with open(os.path.join(out, "eval_config.json"), "w") as f:
    json.dump({"variant": "full", "budget_s": budget_s, "model": model}, f)
  tasks = [types.SimpleNamespace(id=t, title=f"Title of {t}") for t in scores]
  seeds = sorted({s for per in scores.values() for s in per})
  return runner.write_summary(str(out), tasks, seeds)


@pytest.fixture
def two_runs(tmp_path):
  a, b = tmp_path / "sft", tmp_path / "rl"
  a.mkdir()
  b.mkdir()
  sa = _write_run(a, {"p1": {0: 0.2, 1: 0.3}, "p2": {0: 0.5, 1: 0.52}}, model="sft")
  sb = _write_run(b, {"p1": {0: 0.8, 1: 0.9}, "p2": {0: 0.5, 1: 0.54}}, model="rl",
                  judge_failures={("p2", 1): 2})
  return a, sa, b, sb


def test_summary_on_disk_matches_results(two_runs):
  _, _, b, sb = two_runs
  assert json.loads((b / "summary.json").read_text()) == json.loads(json.dumps(sb))
  assert sb["overall"]["mean"] == pytest.approx(((0.8 + 0.5) / 2 + (0.9 + 0.54) / 2) / 2)
  assert sb["pairs"]["p2/1"]["judge_failures"] == 2
  assert sb["pairs"]["p1/0"]["dir"] == os.path.join("runs", "p1", "seed0")
  assert sb["config"]["model"] == "rl" and sb["titles"]["p1"] == "Title of p1"


def test_markdown_and_html_with_comparison(two_runs):
  a, sa, b, sb = two_runs
  md_path, html_path = report.write_reports(str(b), compare_dir=str(a))
  md, page = open(md_path).read(), open(html_path).read()
  # Headline and per-paper numbers (percent, mean ± se).
  assert f"**{report.pm(sb['overall'])}** %" in md
  assert report.pm(sb["papers"]["p1"]) == "85.0 ± 5.0" and "85.0 ± 5.0" in md
  # Links to every graded tree, relative to the report.
  for t in ("p1", "p2"):
    for s in (0, 1):
      assert f"(./runs/{t}/seed{s}/graded_tree.json)" in md
      assert f'href="./runs/{t}/seed{s}/graded_tree.json"' in page
  # Judge failures are flagged, never silent.
  assert "2 judge failure(s)" in md and "p2/seed1: 2/4" in md and "⚠" in page
  # Comparison: A = sft, B = rl; overall diff and per-paper diffs with the se test.
  diff = sb["overall"]["mean"] - sa["overall"]["mean"]
  assert f"{100 * diff:+.1f}" in md
  # Paired over (paper, seed): diffs 0.6, 0.6, 0.0, 0.02 -> mean +0.305.
  assert "Paired over 4 (paper, seed) pairs run by both: B − A +0.305 [" in md
  row = [ln for ln in md.splitlines() if ln.startswith("| p1 |")][-1]  # comparison table
  assert "+60.0" in row and row.rstrip(" |").endswith("yes")  # 0.85 vs 0.25, se ~7.1
  row = [ln for ln in md.splitlines() if ln.startswith("| p2 |")][-1]
  assert "+1.0" in row and row.rstrip(" |").endswith("no")  # 0.52 vs 0.51, se 2.2: within
  # Self-contained HTML: inline CSS + SVG charts, nothing fetched from elsewhere.
  assert page.count("<svg") == 2 and "Score vs time budget" in page
  assert not re.search(r"<(script|link|img)\b[^>]*(src|href)=", page)
  assert "report.html" in page  # link to the other run's report


def test_report_only_a_single_seed_shows_na_standard_error(tmp_path):
  s = _write_run(tmp_path, {"p1": {0: 0.4}})
  md = report.markdown(str(tmp_path), s)
  assert "**40.0** %" in md  # no "± …" with one seed
  page = report.html_report(str(tmp_path), s)
  assert "<svg" in page and "Title of p1" in page


def _chromium() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
    if path := shutil.which(name):
      return path
  return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (make test installs it "
                    "with apt-get where it can: `apt-get install chromium`)")
@pytest.mark.subprocess
def test_html_renders_in_headless_chromium(two_runs, tmp_path):
  """The self-contained page renders offline: a screenshot with the charts' colours in it."""
  a, _, b, _ = two_runs
  _, html_path = report.write_reports(str(b), compare_dir=str(a))
  png = tmp_path / "report.png"
  cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,1400", f"--screenshot={png}", f"file://{html_path}"]
  subprocess.run(cmd, check=True, capture_output=True, timeout=120)
  img = np.asarray(Image.open(png).convert("RGB"))
  assert img.shape[:2] == (1400, 1200)
  colours = {tuple(c) for c in img.reshape(-1, 3)[::37]}
  assert len(colours) > 20, "blank page: the report did not render"
  assert (img.std(axis=(0, 1)) > 10).all()
