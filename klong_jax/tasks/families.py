"""Templates of the bundled mini-paper tasks: a `Family` per tiny algorithm, several parameter sets.

Each family gives the paper's method text, a reference implementation (a function returning the
metrics dict) and parameter sets; `build_suite.py` turns them into task dirs (the parameters
also as the starter file `params.json`) and the scripted teacher writes the same code, loading
them. Keep code short: a tiny language model is trained to reproduce these solutions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
  """A task template: `fn(**params)` returns {metric: value} for each of `metrics`."""

  name: str
  fn: str
  title: str
  method: str
  code: str
  metrics: tuple[str, str]
  params: tuple[dict[str, Any], ...]
  atol: float = 1e-6


FAMILIES: tuple[Family, ...] = (
    Family(
        "arith", "arith_series", "Summing Arithmetic Progressions",
        "An arithmetic progression starts at `a` and adds `d` at each step. We study its first "
        "`n` terms and report their sum (`total`) and the final term (`last`).",
        "def arith_series(a, d, n):\n  t = [a + i * d for i in range(n)]\n"
        "  return {'total': sum(t), 'last': t[-1]}",
        ("total", "last"),
        (dict(a=3, d=2, n=10), dict(a=-4, d=5, n=17), dict(a=7, d=-3, n=12))),
    Family(
        "geom", "geom_series", "Partial Sums of Geometric Series",
        "A geometric series starts at `a` and multiplies by `r` at each step. We take the first "
        "`n` terms and report their sum (`total`) and the final term (`last`).",
        "def geom_series(a, r, n):\n  t = [a * r ** i for i in range(n)]\n"
        "  return {'total': sum(t), 'last': t[-1]}",
        ("total", "last"),
        (dict(a=2, r=0.5, n=8), dict(a=1, r=1.5, n=6), dict(a=5, r=-0.8, n=9))),
    Family(
        "fib", "fib_mod", "Fibonacci Numbers Modulo m",
        "The Fibonacci sequence F(0)=0, F(1)=1, F(k)=F(k-1)+F(k-2) is reduced modulo `m`. We "
        "report F(`n`) mod `m` (`fn`) and the sum of the reduced terms F(0..`n`) mod `m` "
        "(`total`).",
        "def fib_mod(n, m):\n  a, b, s = 0, 1, 0\n  for _ in range(n + 1):\n"
        "    s += a\n    a, b = b, (a + b) % m\n  return {'fn': (b - a) % m, 'total': s}",
        ("fn", "total"),
        (dict(n=20, m=7), dict(n=35, m=11), dict(n=50, m=13))),
    Family(
        "collatz", "collatz_run", "Stopping Times of the Collatz Map",
        "The Collatz map sends x to x/2 when x is even and to 3x+1 when x is odd. Starting from "
        "`start`, we count the steps until reaching 1 (`steps`) and the largest value seen "
        "(`peak`).",
        "def collatz_run(start):\n  x, k, p = start, 0, start\n  while x != 1:\n"
        "    x = x // 2 if x % 2 == 0 else 3 * x + 1\n    k += 1\n    p = max(p, x)\n"
        "  return {'steps': k, 'peak': p}",
        ("steps", "peak"),
        (dict(start=27), dict(start=97), dict(start=871))),
    Family(
        "primes", "prime_sieve", "Counting Primes with a Sieve",
        "The sieve of Eratosthenes marks multiples of each prime below `limit`. We report the "
        "number of primes below `limit` (`count`) and the largest one (`largest`).",
        "def prime_sieve(limit):\n  s = [1] * limit\n  s[0] = s[1] = 0\n"
        "  for i in range(2, limit):\n    if s[i]:\n      for j in range(i * i, limit, i):\n"
        "        s[j] = 0\n  p = [i for i in range(limit) if s[i]]\n"
        "  return {'count': len(p), 'largest': p[-1]}",
        ("count", "largest"),
        (dict(limit=100), dict(limit=1000), dict(limit=5000))),
    Family(
        "gd", "gd_quadratic", "Gradient Descent on a Quadratic",
        "We minimise f(x) = `a` (x - `b`)^2 by gradient descent from x = 0 with learning rate "
        "`lr` for `steps` steps, and report the final x (`x`) and the final loss f(x) (`loss`).",
        "def gd_quadratic(a, b, lr, steps):\n  x = 0.0\n  for _ in range(steps):\n"
        "    x -= lr * 2 * a * (x - b)\n  return {'x': x, 'loss': a * (x - b) ** 2}",
        ("x", "loss"),
        (dict(a=1.0, b=3.0, lr=0.1, steps=20), dict(a=2.0, b=-1.5, lr=0.05, steps=30),
         dict(a=0.5, b=4.0, lr=0.3, steps=15))),
    Family(
        "newton", "newton_sqrt", "Newton's Method for Square Roots",
        "Newton's method for sqrt(`k`) starts at x = `k` and repeats x = (x + `k`/x)/2 for "
        "`iters` iterations. We report the estimate (`root`) and the error |x^2 - `k`| (`err`).",
        "def newton_sqrt(k, iters):\n  x = float(k)\n  for _ in range(iters):\n"
        "    x = (x + k / x) / 2\n  return {'root': x, 'err': abs(x * x - k)}",
        ("root", "err"),
        (dict(k=2, iters=3), dict(k=10, iters=4), dict(k=50, iters=5))),
    Family(
        "logistic", "logistic_map", "Orbits of the Logistic Map",
        "The logistic map iterates x = `r` x (1 - x) from x = `x0` for `n` steps. We report the "
        "final value (`final`) and the mean of the `n` iterates after the start (`mean`).",
        "def logistic_map(r, x0, n):\n  x, t = x0, []\n  for _ in range(n):\n"
        "    x = r * x * (1 - x)\n    t.append(x)\n  return {'final': x, 'mean': sum(t) / n}",
        ("final", "mean"),
        (dict(r=2.5, x0=0.2, n=30), dict(r=3.2, x0=0.4, n=40), dict(r=3.5, x0=0.1, n=25))),
    Family(
        "movavg", "moving_average", "Moving-Average Smoothing of a Series",
        "We smooth the series `values` with a trailing moving average of window `w` (means of "
        "each run of `w` consecutive values) and report the last average (`last`) and the largest "
        "one (`peak`).",
        "def moving_average(values, w):\n"
        "  m = [sum(values[i:i + w]) / w for i in range(len(values) - w + 1)]\n"
        "  return {'last': m[-1], 'peak': max(m)}",
        ("last", "peak"),
        (dict(values=[3, 1, 4, 1, 5, 9, 2, 6], w=3), dict(values=[10, 20, 5, 15, 25, 0], w=2),
         dict(values=[2, 7, 1, 8, 2, 8, 1, 8, 2], w=4))),
    Family(
        "linreg", "linreg_fit", "Least-Squares Line Fitting",
        "Ordinary least squares fits y = slope x + intercept to the points (`xs`, `ys`). We "
        "report the fitted `slope` and `intercept`.",
        "def linreg_fit(xs, ys):\n  n = len(xs)\n  mx, my = sum(xs) / n, sum(ys) / n\n"
        "  sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))\n"
        "  sxx = sum((x - mx) ** 2 for x in xs)\n"
        "  return {'slope': sxy / sxx, 'intercept': my - sxy / sxx * mx}",
        ("slope", "intercept"),
        (dict(xs=[0, 1, 2, 3], ys=[1, 3, 4, 8]), dict(xs=[1, 2, 4, 5, 7], ys=[2, 1, 5, 4, 9]),
         dict(xs=[-2, 0, 1, 3], ys=[5, 2, 2, -1]))),
)
FAMILY_BY_FN = {f.fn: f for f in FAMILIES}
SOLUTION_FILE = "solution.py"
METRICS_FILE = "results/metrics.json"
# The experiment's parameters as released with the paper: a starter file in the submission dir
# (so the fresh reproduce sandbox has it too). The solution loads it instead of retyping the
# constants: the tiny model never learned to copy a whole argument list from the paper (0 of 492
# RL rollouts did), which left half of every rubric unreachable and RL without a results signal.
PARAMS_FILE = "params.json"
RL_SETS = 3  # Fresh parameter sets per family for the RL split (none seen in SFT or held out).
# Extra fresh sets per family in the train split: with only the 2 hand-written sets the tiny
# model memorises their constants instead of copying the paper's (what held-out tasks need).
TRAIN_SETS = 4


def format_params(params: dict[str, Any]) -> str:
  """`a=3, d=2` -- the literal argument list the paper states."""
  return ", ".join(f"{k}={v!r}" for k, v in params.items())


def literal_call(family: Family, params: dict[str, Any]) -> str:
  """`arith_series(a=3, d=2, n=10)` -- the call with the constants retyped from the paper."""
  return f"{family.fn}({format_params(params)})"


def solution_call(family: Family) -> str:
  """The solution's call: the family's function on the parameters loaded from `PARAMS_FILE`."""
  return f"{family.fn}(**json.load(open('{PARAMS_FILE}')))"


def reference_metrics(family: Family, params: dict[str, Any]) -> dict[str, float]:
  """Runs the reference implementation in-process (build time only) to get expected metrics."""
  scope: dict[str, Any] = {}
  exec(family.code, scope)  # noqa: S102 - our own bundled template code
  out = scope[family.fn](**params)
  return {k: float(out[k]) for k in family.metrics}


def fresh_params(family: Family, count: int, seed: int = 0) -> list[dict[str, Any]]:
  """`count` new parameter sets for `family`, drawn inside the ranges its own sets span.

  Ints uniform in [min, max] of the family's values for that key, floats likewise (2 decimals),
  lists with the length range of the family's lists (all lists of a set share one length) and
  elements in their value range. A draw is kept only if the reference implementation returns
  finite metrics and it equals no existing or earlier set; deterministic in (family, seed).
  """
  rng = random.Random(f"{family.name}:{seed}")
  seen = list(family.params)
  lens = [len(v) for p in family.params for v in p.values() if isinstance(v, list)]
  out: list[dict[str, Any]] = []
  for _ in range(1000 * count):
    if len(out) == count:
      break
    n = rng.randint(min(lens), max(lens)) if lens else 0
    new: dict[str, Any] = {}
    for k, v0 in family.params[0].items():
      vals = [p[k] for p in family.params]
      if isinstance(v0, list):
        flat = [x for v in vals for x in v]
        new[k] = [rng.randint(min(flat), max(flat)) for _ in range(n)]
      elif isinstance(v0, int):
        new[k] = rng.randint(min(vals), max(vals))
      else:
        new[k] = round(rng.uniform(min(vals), max(vals)), 2)
    if "w" in new and lens:  # window must fit the values
      new["w"] = min(new["w"], n)
    if new in seen:
      continue
    try:
      metrics = reference_metrics(family, new)
    except (ArithmeticError, ValueError, IndexError):
      continue
    if all(math.isfinite(x) for x in metrics.values()):
      out.append(new)
      seen.append(new)
  if len(out) < count:
    raise RuntimeError(f"family {family.name}: could not draw {count} valid fresh parameter sets")
  return out
