"""Inline SVG charts for the eval report (matplotlib, Agg): per-category bars and score vs time,
one series per run, error bars = standard error across seeds.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from klong_jax.eval.timeline import format_duration
from klong_jax.grading.rubric import CATEGORIES

_COLORS = ("#3b6ea8", "#d9822b", "#4e9a52", "#a54a9c")


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  matplotlib.rcParams["svg.fonttype"] = "none"  # Text stays text: small, searchable SVG.
  matplotlib.rcParams["svg.hashsalt"] = "klong"  # Stable ids: same data -> same SVG.
  import matplotlib.pyplot as plt
  return plt


def _svg(fig: Any) -> str:
  buf = io.StringIO()
  fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
  _pyplot().close(fig)
  text = buf.getvalue()
  return re.sub(r"^.*?(<svg\b)", r"\1", text, count=1, flags=re.DOTALL)  # Drop XML prolog.


def _pct(v: float | None) -> float:
  return 0.0 if v is None else 100.0 * v


def category_bars(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
  """Grouped bars: mean category score (%) per run, with standard-error whiskers."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.2))
  width = 0.8 / max(1, len(runs))
  for i, (label, summary) in enumerate(runs):
    cats = summary["categories"]
    xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(CATEGORIES))]
    ys = [_pct(cats[c]["mean"]) for c in CATEGORIES]
    err = [_pct(cats[c]["se"]) for c in CATEGORIES]
    bars = ax.bar(xs, ys, width * 0.95, yerr=err, capsize=3, label=label,
                  color=_COLORS[i % len(_COLORS)])
    for b, c, e in zip(bars, CATEGORIES, err, strict=True):
      text = "n/a" if cats[c]["mean"] is None else f"{_pct(cats[c]['mean']):.1f}"
      ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height() + e), ha="center",
                  va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
  ax.set_xticks(range(len(CATEGORIES)), CATEGORIES)
  ax.set_ylim(0, 115)
  ax.set_ylabel("score (%)")
  ax.set_title("Score by rubric category")
  if len(runs) > 1:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(runs))
  ax.grid(axis="y", alpha=0.3)
  return _svg(fig)


def score_vs_time(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str | None:
  """Run score (%) if the budget had been cut at each time; None when no run has a timeline."""
  series = [(label, s["timeline"]) for label, s in runs if s.get("timeline")]
  if not series:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 3.2))
  ticks: list[float] = []
  for i, (label, line) in enumerate(series):
    xs = [p["cut_s"] for p in line]
    ys = [_pct(p["mean"]) for p in line]
    err = [_pct(p["se"]) for p in line]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label,
                color=_COLORS[i % len(_COLORS)])
    ticks = sorted(set(ticks) | set(xs))
  ax.set_xscale("log", base=2)
  ax.set_xticks(ticks, [format_duration(t) for t in ticks])
  ax.minorticks_off()
  ax.set_ylim(0, 105)
  ax.set_xlabel("time budget cut")
  ax.set_ylabel("score (%)")
  ax.set_title("Score vs time budget")
  if len(series) > 1:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(series))
  ax.grid(alpha=0.3)
  return _svg(fig)


def reward_by_step_png(curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                       path: str, labels: Mapping[str, str], title: str) -> str:
  """A PNG with one panel per family (and "all" last): per run, mean reward by step with its
  interval (`lo`/`hi`, e.g. stats.t_interval) as a band, none where a step has no interval.
  `curves`: {run: {family: [{"step", "mean", "lo", "hi"}]}}. Written atomically."""
  plt = _pyplot()

  fams = sorted({f for c in curves.values() for f in c if f != "all"})
  fams += ["all"] if any("all" in c for c in curves.values()) else []
  cols = 4
  rows = max(1, math.ceil(len(fams) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False,
                           sharex=True, sharey=True)
  for ax, fam in zip(axes.flat, fams, strict=False):
    for i, (arm, c) in enumerate(curves.items()):
      pts = c.get(fam) or []
      xs = [p["step"] for p in pts]
      ax.plot(xs, [p["mean"] for p in pts], marker="o", ms=3, color=f"C{i}",
              label=labels.get(arm, arm))
      band = [p for p in pts if p["lo"] is not None]
      if band:
        ax.fill_between([p["step"] for p in band], [p["lo"] for p in band],
                        [p["hi"] for p in band], color=f"C{i}", alpha=0.2, lw=0)
    ax.set_title(fam, fontsize=9)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(fams):]:
    ax.axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("RL step (sampling policy version)", fontsize=8)
  handles, names = axes.flat[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.05, 1, 0.96))
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
