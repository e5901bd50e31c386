"""Confidence intervals for evals: t-based and bootstrap over episodes, over seeds (two-stage),
and the paired difference of two arms run on the same (task, episode) keys (JAX- and scipy-free).

Why paired: two arms evaluated on the same task x seed pairs share the task difficulty (and,
with seeded sampling, the random numbers), so the per-pair difference varies far less than
either arm; its interval is what tells a +0.02 effect from noise. The unpaired (Welch) interval
is reported beside it so a reader sees what pairing bought.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the regularized incomplete beta (Numerical Recipes betacf)."""
  tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 300):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
    delta = d * c
    h *= delta
    if abs(delta - 1.0) < 1e-15:
      break
  return h


def _betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
  front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """Student-t CDF with `df` degrees of freedom."""
  tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """Student-t quantile (bisection on t_cdf; exact to ~1e-10)."""
  if not 0.0 < p < 1.0 or df <= 0:
    raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    hi *= 2.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
    if hi - lo < 1e-12:
      break
  return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean with its confidence interval; lo/hi/se are None when n is too small for one."""

  mean: float | None
  lo: float | None
  hi: float | None
  se: float | None
  n: int
  method: str
  level: float = LEVEL

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def half_width(self) -> float | None:
    return None if self.lo is None or self.hi is None else (self.hi - self.lo) / 2.0

  def excludes(self, value: float = 0.0) -> bool | None:
    """Whether the interval lies wholly on one side of `value` (None without an interval)."""
    if self.lo is None or self.hi is None:
      return None
    return self.lo > value or self.hi < value


def _values(values: Sequence[float]) -> np.ndarray:
  arr = np.asarray([float(v) for v in values], dtype=np.float64)
  if arr.size and not np.all(np.isfinite(arr)):
    raise ValueError("interval over non-finite values; drop infra errors (reward None) first")
  return arr


def _too_few(x: np.ndarray, method: str, level: float) -> Interval | None:
  """The interval of fewer than 2 values (no mean, or a mean without bounds); None otherwise."""
  if x.size >= 2:
    return None
  return Interval(float(x.mean()) if x.size else None, None, None, None, int(x.size), method,
                  level)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
  """Mean ± t_{(1+level)/2, n-1} * sd/sqrt(n) over independent values (episodes or seeds)."""
  x = _values(values)
  if (few := _too_few(x, "t", level)) is not None:
    return few
  n, m = int(x.size), float(x.mean())
  se = float(x.std(ddof=1) / math.sqrt(n))
  h = t_quantile((1.0 + level) / 2.0, n - 1) * se
  return Interval(m, m - h, m + h, se, n, "t", level)


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                       seed: int = 0, clusters: Sequence[Hashable] | None = None) -> Interval:
  """Percentile bootstrap of the mean. With `clusters` (e.g. the seed of each episode) it is
  two-stage: resample clusters, then episodes within each drawn cluster, so seed-to-seed
  variation is in the interval. Seeded: the same data give the same interval."""
  x = _values(values)
  if (few := _too_few(x, "bootstrap", level)) is not None:
    return few
  n, m = int(x.size), float(x.mean())
  rng = np.random.default_rng(seed)
  if clusters is None:
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    method = "bootstrap"
  else:
    if len(clusters) != n:
      raise ValueError(f"clusters has {len(clusters)} labels for {n} values")
    groups = [x[[i for i, c in enumerate(clusters) if c == k]] for k in dict.fromkeys(clusters)]
    g = len(groups)
    means = np.empty(n_boot)
    for b in range(n_boot):
      picked = [groups[i] for i in rng.integers(0, g, size=g)]
      means[b] = np.concatenate([p[rng.integers(0, p.size, size=p.size)] for p in picked]).mean()
    method = f"bootstrap over {g} clusters"
  lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return Interval(m, float(lo), float(hi), float(means.std(ddof=1)), n, method, level)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
  """Unpaired interval of mean(b) - mean(a) (Welch-Satterthwaite degrees of freedom)."""
  xa, xb = _values(a), _values(b)
  if xa.size == 0 or xb.size == 0:
    return Interval(None, None, None, None, 0, "welch", level)
  d = float(xb.mean() - xa.mean())
  n = int(min(xa.size, xb.size))
  if xa.size < 2 or xb.size < 2:
    return Interval(d, None, None, None, n, "welch", level)
  va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
  se = math.sqrt(va + vb)
  if se == 0.0:
    return Interval(d, d, d, 0.0, n, "welch", level)
  df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
  h = t_quantile((1.0 + level) / 2.0, df) * se
  return Interval(d, d - h, d + h, se, n, "welch", level)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      level: float = LEVEL, seed: int = 0,
                      cluster: Any = None) -> dict[str, Any]:
  """B - A over the keys both arms have (a key = one (seed, task, episode) pair).

  Returns `paired_t` and `paired_bootstrap` intervals of the mean per-pair difference (the
  bootstrap two-stage over `cluster(key)` when given, e.g. the seed), the unpaired `welch`
  interval over the same pairs for reference, the correlation of the pairs, and the keys only
  one arm has (left out: an infra error or an unfinished run on one side).
  """
  keys = [k for k in a if k in b]
  da = [float(a[k]) for k in keys]
  db = [float(b[k]) for k in keys]
  diffs = [y - x for x, y in zip(da, db, strict=True)]
  corr = None
  if len(keys) > 2 and np.std(da) > 0 and np.std(db) > 0:
    corr = float(np.corrcoef(da, db)[0, 1])
  clusters = [cluster(k) for k in keys] if cluster is not None else None
  if clusters is not None and len(set(clusters)) < 2:
    clusters = None
  return {"n_pairs": len(keys), "only_a": sum(1 for k in a if k not in b),
          "only_b": sum(1 for k in b if k not in a), "a": statistics.fmean(da) if da else None,
          "b": statistics.fmean(db) if db else None, "correlation": corr,
          "paired_t": t_interval(diffs, level).to_dict(),
          "paired_bootstrap": bootstrap_interval(diffs, level, seed=seed,
                                                 clusters=clusters).to_dict(),
          "welch": welch_interval(da, db, level).to_dict()}


def seed_summary(values_by_seed: Mapping[Hashable, Sequence[float]],
                 level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
  """An arm over several seeds: per-seed means, the t interval over the seed means (the
  seed-to-seed spread; df = seeds - 1), and the two-stage bootstrap over seeds and episodes."""
  per_seed = {str(s): float(np.mean(v)) for s, v in values_by_seed.items() if len(v)}
  flat = [float(x) for v in values_by_seed.values() for x in v]
  labels = [s for s, v in values_by_seed.items() for _ in v]
  clusters = labels if len(per_seed) > 1 else None
  return {"per_seed": per_seed, "episodes": len(flat),
          "over_seeds": t_interval(list(per_seed.values()), level).to_dict(),
          "over_episodes": t_interval(flat, level).to_dict(),
          "bootstrap": bootstrap_interval(flat, level, seed=seed, clusters=clusters).to_dict()}


def fmt(iv: Mapping[str, Any] | Interval, digits: int = 3, signed: bool = False) -> str:
  """'0.437 [0.402, 0.471]' (or '+0.021 [...]'); 'n/a' pieces where undefined."""
  d = iv.to_dict() if isinstance(iv, Interval) else iv
  if d.get("mean") is None:
    return "n/a"
  f = f"{{:{'+' if signed else ''}.{digits}f}}"
  if d.get("lo") is None:
    return f.format(d["mean"])
  return f"{f.format(d['mean'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def fmean_or_none(values: Sequence[float]) -> float | None:
  """Mean, or None for no values."""
  return statistics.fmean(values) if len(values) else None
