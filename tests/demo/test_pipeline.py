"""CI-sized smoke of the demo orchestration: tokenizer -> distill -> split-SFT as child processes.

`configs/demo.py:runlocal` shrinks the run (2 train tasks, 1 episode each, local sandbox backend,
4 SFT steps); `stop_after=sft` ends before the phases that need the inference server and the RL
trainer, which have their own integration tests. Checks real outputs, not exit codes alone.
"""

import json
import os
import subprocess
import sys

import pytest

from klong_jax.data import shards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.subprocess
def test_demo_runs_through_sft_and_resumes(tmp_path):
  wd = tmp_path / "demo"
  cmd = [sys.executable, "-m", "klong_jax.demo", f"--workdir={wd}",
         "--config=configs/demo.py:runlocal", "--config.stop_after=sft"]
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  for phase in ("[1/8] tokenizer done", "[2/8] distill done", "[3/8] sft done"):
    assert phase in res.stdout, res.stdout
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["distill"]["kept"] == 2  # Skill-1.0 teacher: both train episodes kept.
  assert summary["distill"]["teacher_mean"] == 1.0
  assert set(summary["phases_s"]) == {"tokenizer", "distill", "sft"}
  # Domain tokenizer: the fixed prompt prefix (system + tools + paper) is a few hundred tokens.
  assert 100 < summary["prefix_tokens"] < 600, summary["prefix_tokens"]
  assert len(shards.list_shards(str(wd / "distill" / "sft"))) == 2
  assert (wd / "sft" / "checkpoints").is_dir() and (wd / "sft" / "metrics.jsonl").exists()
  assert sorted(os.listdir(wd / "tasks" / "heldout")) == ["arith-3"]
  for log in ("distill.log", "sft.log"):
    assert (wd / "logs" / log).stat().st_size > 0
  # A re-run skips finished phases (SFT is not retrained).
  steps_before = (wd / "sft" / "metrics.jsonl").read_text()
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert (wd / "sft" / "metrics.jsonl").read_text() == steps_before
  # The re-run's summary keeps the times of the run that did the work.
  again = json.loads((wd / "summary.json").read_text())
  assert again["phases_first_s"] == summary["phases_s"]
  assert again["phases_s"]["sft"] < summary["phases_s"]["sft"]
