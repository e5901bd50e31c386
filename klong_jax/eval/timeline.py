"""Time budgets and score-vs-time cuts: parse "12h", place cuts at 1h/2h/4h... scaled to the
budget, and pick the submission snapshot (git commit or final) each cut would have graded (pure).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

FINAL = "final"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_budget(text: str | float | int) -> float:
  """Seconds from "12h", "1h30m", "90s", "45m" or a plain number of seconds; must be > 0."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    s = str(text).strip().lower().replace(" ", "")
    try:
      value = float(s)
    except ValueError:
      parts = _PART.findall(s)
      if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"budget {text!r} is not a duration; write e.g. '12h', '1h30m', '90s' "
                         "or a number of seconds") from None
      value = sum(float(n) * _UNITS[u] for n, u in parts)
  if not value > 0:
    raise ValueError(f"budget {text!r} must be > 0 seconds")
  return value


def format_duration(seconds: float) -> str:
  """Compact duration for tables and axes: 45s, 7.5m, 2h, 1.5h."""
  if seconds >= 3600:
    return f"{seconds / 3600:g}h"
  if seconds >= 60:
    return f"{seconds / 60:g}m"
  return f"{seconds:g}s"


def budget_cuts(budget_s: float, base_s: float | None = None) -> list[float]:
  """Cut times base, 2·base, 4·base... below the budget, then the budget itself.

  The default base is budget/12, so a 12h budget gives the paper's 1h, 2h, 4h, 8h, 12h.
  """
  if not budget_s > 0:
    raise ValueError(f"budget_s must be > 0, got {budget_s}")
  base = budget_s / 12.0 if base_s is None else float(base_s)
  if not base > 0:
    raise ValueError(f"base_s must be > 0, got {base_s}")
  cuts, t = [], base
  while t < budget_s * (1 - 1e-9):
    cuts.append(round(t, 6))
    t *= 2
  return cuts + [float(budget_s)]


def pick_sources(cuts: Sequence[float], commits: Sequence[tuple[str, float]],
                 end_s: float) -> list[str | None]:
  """For each cut: FINAL, the sha of the newest commit made by then, or None (nothing yet).

  `commits` are (sha, seconds since the episode started); `end_s` is when the agent stopped. The
  last cut is the budget, where the final submission counts even if the last step ran over.
  """
  ordered = sorted(commits, key=lambda c: c[1])
  out: list[str | None] = []
  for i, cut in enumerate(cuts):
    if i == len(cuts) - 1 or end_s <= cut:
      out.append(FINAL)
      continue
    made = [sha for sha, t in ordered if t <= cut]
    out.append(made[-1] if made else None)
  return out
