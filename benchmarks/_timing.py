"""Wall-clock timing shared by the benchmarks (ratios are taken within one run, never across)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


def best_time(fn: Callable[..., Any], *args: Any, repeats: int = 3) -> float:
  """Best wall-clock seconds of `repeats` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best
