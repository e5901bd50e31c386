"""Summary table, reward plot PNG, and the phase progress/ETA lines."""

import math

import pytest

from klong_jax.demo import summary


def test_format_table_aligns_and_formats():
  rows = [{"phase": "sft", "reward": 0.25, "n": 8}, {"phase": "rl", "reward": None, "n": 12}]
  text = summary.format_table(rows, ["phase", "reward", "n"], title="T")
  lines = text.splitlines()
  assert lines[0] == "T"
  assert lines[1].split() == ["phase", "reward", "n"]
  assert lines[3].split() == ["sft", "0.250", "8"]
  assert lines[4].split() == ["rl", "-", "12"]
  assert len({len(ln) for ln in lines[1:]}) == 1  # Columns aligned.


def test_mean_std():
  m, s = summary.mean_std([1.0, 3.0])
  assert (m, s) == (2.0, 1.0)
  assert all(math.isnan(x) for x in summary.mean_std([]))


def test_plot_rewards_writes_png(tmp_path):
  path = tmp_path / "sub" / "reward.png"
  out = summary.plot_rewards({"rl": [(0, 0.2), (1, 0.4), (2, 0.5)]}, str(path),
                             marks={"sft": 0.3}, stage_starts=[(0, "stage 0"), (2, "stage 1")])
  assert out == str(path)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
  assert [p.name for p in path.parent.iterdir()] == ["reward.png"]  # No temp left behind.


def test_progress_lines_and_eta():
  lines = []
  clock = [0.0]
  p = summary.Progress({"a": 10.0, "b": 30.0}, printer=lines.append, prior_s=0.0)
  p.t0 = 0.0
  import klong_jax.demo.summary as mod
  real = mod.time.monotonic
  mod.time.monotonic = lambda: clock[0]
  try:
    assert p.eta() == 40.0
    p.start("a")
    clock[0] = 20.0  # Phase a took twice its budget: the ETA of b doubles.
    p.end("done")
    assert p.eta() == 60.0
    p.start("b")
    clock[0] = 50.0
    p.end()
    assert p.eta() == 0.0
  finally:
    mod.time.monotonic = real
  assert lines[0].startswith("[1/2] a") and "ETA 40s" in lines[0]
  assert lines[1].startswith("[1/2] a done in 20s -- done") and "ETA 1m00s" in lines[1]
  assert lines[2].startswith("[2/2] b")


def test_progress_eta_not_swung_by_a_tiny_phase():
  p = summary.Progress({"tok": 2.0, "train": 1200.0}, printer=lambda s: None)
  p.done["tok"] = 0.5  # 4x faster than budgeted, but only 1.5 s of evidence.
  assert 1150.0 < p.eta() < 1200.0
  p.done["tok"] = 2.0
  assert p.eta() == 1200.0


def test_trainer_mismatch_digests_rl_metrics():
  hist = [{"stage": "stage 1 starts"},  # event rows (no "loss") are not train steps
          {"loss": 1.0, "ppo/logprob_gap_mean_first": 0.02, "logprob_gap_mean": 0.05,
           "logprob_gap_max": 1.5, "kl_max": 3.0, "kl": 0.01, "routing_flip": 0.1},
          {"loss": 1.0, "logprob_gap_mean": 0.04, "logprob_gap_max": 0.5, "kl_max": 12.0,
           "kl": 0.03, "routing_flip": 0.3}]
  m = summary.trainer_mismatch(hist)
  assert m["steps"] == 2.0
  assert m["logprob_gap_mean"] == pytest.approx(0.03)  # first update's gap where logged
  assert m["logprob_gap_max"] == 1.5 and m["kl_max"] == 12.0
  assert m["kl_mean"] == pytest.approx(0.02) and m["routing_flip"] == pytest.approx(0.2)
  off = summary.trainer_mismatch([{k: v for k, v in h.items() if k != "routing_flip"}
                                  for h in hist])
  assert math.isnan(off["routing_flip"]) and off["kl_max"] == 12.0
  assert math.isnan(summary.trainer_mismatch([])["logprob_gap_mean"])


def test_ci_cell_is_the_t_interval():
  # mean 3, se sqrt(0.5), t_{0.975,4} = 2.776445: [1.037, 4.963]
  assert summary.ci_cell([1.0, 2.0, 3.0, 4.0, 5.0]) == "[1.037, 4.963]"
  assert summary.ci_cell([0.5]) == "-" and summary.ci_cell([]) == "-"
