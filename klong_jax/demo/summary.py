"""End-of-run reporting: a plain-text summary table, a reward-vs-step PNG, phase progress lines.

Pure formatting over plain dicts/lists (no JAX); the PNG is drawn with matplotlib's Agg backend
and written atomically (temp + rename) so a reader never sees half a file.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
  return str(v)


def trainer_mismatch(hist: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Sampler-vs-trainer agreement over an RL run's train-step records (metrics.jsonl): the
  figures routing replay (R3) is judged by. `logprob_gap_mean`: mean over steps of the first
  update's mean |trainer - sampler logprob| per loss token (staleness included);
  `logprob_gap_max`/`kl_max`: the largest over the run; `routing_flip`: mean share of recorded
  (token, layer) selections the trainer would have routed elsewhere (only with R3 on)."""
  steps = [h for h in hist if "loss" in h]

  def col(*keys: str) -> list[float]:
    return [float(next(h[k] for k in keys if k in h)) for h in steps
            if any(k in h for k in keys)]

  def agg(vals: list[float], fn: Any) -> float:
    return float(fn(vals)) if vals else float("nan")

  mean = statistics.fmean
  return {"steps": float(len(steps)),
          "logprob_gap_mean": agg(col("ppo/logprob_gap_mean_first", "logprob_gap_mean"), mean),
          "logprob_gap_max": agg(col("logprob_gap_max"), max),
          "kl_max": agg(col("kl_max"), max),
          "kl_mean": agg(col("kl"), mean),
          "routing_flip": agg(col("routing_flip"), mean)}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 title: str = "") -> str:
  """Rows of dicts as an aligned text table; `columns` picks and orders the keys."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
  cells = [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = "  ".join("-" * w for w in widths)
  out = [title] if title else []
  out.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
  out.append(line)
  out.extend("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells)
  return "\n".join(out)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and population standard deviation ((nan, nan) for no values)."""
  if not values:
    return float("nan"), float("nan")
  m = sum(values) / len(values)
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def ci_cell(values: Sequence[float], level: float = 0.95) -> str:
  """The t interval of the mean of `values` as a table cell: "[0.402, 0.471]" ("-" below 2)."""
  from klong_jax.eval.stats import t_interval  # noqa: PLC0415

  iv = t_interval(values, level)
  return "-" if iv.lo is None else f"[{iv.lo:.3f}, {iv.hi:.3f}]"


def plot_rewards(series: Mapping[str, Sequence[tuple[float, float]]], path: str,
                 title: str = "mean reward vs step",
                 marks: Mapping[str, float] | None = None,
                 stage_starts: Sequence[tuple[float, str]] = ()) -> str:
  """Draws each named series of (step, reward) points to a PNG at `path`; returns the path.

  `marks` draws horizontal reference lines (e.g. held-out reward after SFT / after RL);
  `stage_starts` draws a vertical line per (step, label) where a progressive-RL stage begins.
  """
  import matplotlib  # noqa: PLC0415 - heavy; only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  try:
    for name, pts in series.items():
      pts = sorted(pts)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    for i, (name, y) in enumerate((marks or {}).items()):
      ax.axhline(y, ls="--", lw=1, color=f"C{(i + len(series)) % 10}", label=f"{name} {y:.3f}")
    for x, label in stage_starts:
      ax.axvline(x, ls=":", lw=1, color="gray")
      ax.text(x, 1.0, f" {label}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
  return path


class Progress:
  """Prints one line per phase: `[k/N] name ... done in 12.3s (total 1m02s, ETA 3m10s)`.

  `budgets` are the expected seconds per phase (from config); the ETA is the sum of the budgets
  of the phases still to run, scaled by how far over/under budget the finished phases ran. The
  scale starts from `prior_s` seconds of exactly-on-budget work, so a 1 s phase finishing in half
  its budget does not halve the ETA of a 20 min run.
  """

  def __init__(self, budgets: Mapping[str, float], printer=print, prior_s: float = 60.0):
    self.names = list(budgets)
    self.prior_s = prior_s
    self.budgets = dict(budgets)
    self.printer = printer
    self.t0 = time.monotonic()
    self.done: dict[str, float] = {}
    self._current: tuple[str, float] | None = None

  def _fmt(self, s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"

  def eta(self) -> float:
    left = [n for n in self.names if n not in self.done]
    spent = sum(self.done.values()) + self.prior_s
    planned = sum(self.budgets[n] for n in self.done) + self.prior_s
    scale = spent / planned if planned > 0 else 1.0
    return scale * sum(self.budgets[n] for n in left)

  def start(self, name: str, note: str = "") -> None:
    if name not in self.budgets:
      raise KeyError(f"phase {name!r} is not in the plan {self.names}")
    k = self.names.index(name) + 1
    self._current = (name, time.monotonic())
    self.printer(f"[{k}/{len(self.names)}] {name}{': ' + note if note else ''} "
                 f"(elapsed {self._fmt(time.monotonic() - self.t0)}, ETA {self._fmt(self.eta())})")

  def end(self, note: str = "") -> float:
    if self._current is None:
      raise RuntimeError("Progress.end() without start()")
    name, t = self._current
    dt = time.monotonic() - t
    self.done[name] = dt
    self._current = None
    k = self.names.index(name) + 1
    elapsed = self._fmt(time.monotonic() - self.t0)
    extra = f" -- {note}" if note else ""
    self.printer(f"[{k}/{len(self.names)}] {name} done in {self._fmt(dt)}{extra} "
                 f"(elapsed {elapsed}, ETA {self._fmt(self.eta())})")
    return dt

  def note(self, text: str) -> None:
    """A progress line inside the current phase (e.g. RL step k of n)."""
    name = self._current[0] if self._current else "-"
    self.printer(f"    {name}: {text} (elapsed {self._fmt(time.monotonic() - self.t0)})")
