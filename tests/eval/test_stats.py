"""Eval confidence intervals: known data give known intervals; pairing narrows correlated ones."""

import math

import numpy as np
import pytest

from klong_jax.eval import stats


def test_t_quantile_matches_tables():
  # Student-t table values (two-sided 95% and one-sided 95%).
  for df, want in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139),
                   (29, 2.045230), (99, 1.984217)]:
    assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=1e-6)
  assert stats.t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)
  assert stats.t_quantile(0.025, 10) == pytest.approx(-2.228139, abs=1e-6)
  with pytest.raises(ValueError, match="0 < p < 1"):
    stats.t_quantile(1.0, 3)


def test_t_interval_known_data():
  iv = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  # mean 3, sd sqrt(2.5), se sqrt(0.5), t_{0.975,4} = 2.776445
  h = 2.776445 * math.sqrt(0.5)
  assert (iv.mean, iv.n) == (3.0, 5)
  assert iv.lo == pytest.approx(3.0 - h, abs=1e-6) and iv.hi == pytest.approx(3.0 + h, abs=1e-6)
  assert iv.excludes(0.0) and not iv.excludes(3.0)
  one = stats.t_interval([0.5])
  assert one.mean == 0.5 and one.lo is None and one.excludes() is None
  assert stats.t_interval([]).mean is None
  with pytest.raises(ValueError, match="non-finite"):
    stats.t_interval([1.0, float("nan")])


def test_bootstrap_close_to_t_and_seeded():
  rng = np.random.default_rng(0)
  x = rng.choice([0.25, 0.5, 1.0], size=400).tolist()
  t, b = stats.t_interval(x), stats.bootstrap_interval(x, seed=3)
  assert b.mean == t.mean
  assert b.lo == pytest.approx(t.lo, abs=0.01) and b.hi == pytest.approx(t.hi, abs=0.01)
  assert stats.bootstrap_interval(x, seed=3) == b  # Same data, same seed: same interval.
  # Two-stage over clusters: seeds that differ widen the interval beyond the episode one.
  vals = [0.2] * 50 + [0.5] * 50 + [0.8] * 50
  flat = stats.bootstrap_interval(vals, seed=1)
  clustered = stats.bootstrap_interval(vals, seed=1, clusters=[0] * 50 + [1] * 50 + [2] * 50)
  assert clustered.hi - clustered.lo > 2 * (flat.hi - flat.lo)


def test_paired_narrower_than_unpaired_on_correlated_data():
  rng = np.random.default_rng(1)
  difficulty = rng.uniform(0.0, 1.0, size=120)  # Shared by both arms (the task x seed pair).
  a = {("s0", i): float(d + rng.normal(0, 0.05)) for i, d in enumerate(difficulty)}
  b = {("s0", i): float(d + 0.03 + rng.normal(0, 0.05)) for i, d in enumerate(difficulty)}
  b[("s0", 999)] = 1.0  # Only one arm: left out and counted.
  r = stats.paired_difference(a, b)
  pt, welch = stats.Interval(**r["paired_t"]), stats.Interval(**r["welch"])
  assert r["n_pairs"] == 120 and r["only_b"] == 1 and r["only_a"] == 0
  assert r["correlation"] > 0.9
  assert pt.hi - pt.lo < 0.25 * (welch.hi - welch.lo)
  assert pt.excludes(0.0) and not welch.excludes(0.0)  # Pairing resolves the +0.03.
  assert pt.mean == pytest.approx(welch.mean) and pt.mean == pytest.approx(0.03, abs=0.02)
  pb = stats.Interval(**r["paired_bootstrap"])
  assert pb.lo == pytest.approx(pt.lo, abs=0.005) and pb.hi == pytest.approx(pt.hi, abs=0.005)


def test_welch_known_data():
  iv = stats.welch_interval([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
  va, vb = 1.0 / 3, (20.0 / 3) / 4
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
  assert iv.mean == pytest.approx(3.0)
  assert iv.hi - iv.mean == pytest.approx(stats.t_quantile(0.975, df) * se)


def test_seed_summary_and_fmt():
  s = stats.seed_summary({0: [0.4, 0.5], 1: [0.6, 0.7], 2: [0.5, 0.5]})
  assert s["per_seed"] == {"0": pytest.approx(0.45), "1": pytest.approx(0.65), "2": 0.5}
  over = stats.Interval(**s["over_seeds"])
  assert over.n == 3 and over.mean == pytest.approx(1.6 / 3)
  assert s["episodes"] == 6 and s["bootstrap"]["method"] == "bootstrap over 3 clusters"
  assert stats.fmt(stats.Interval(0.5, 0.4, 0.6, 0.05, 10, "t")) == "0.500 [0.400, 0.600]"
  assert stats.fmt({"mean": 0.02, "lo": None}, signed=True) == "+0.020"
