"""PaperBench score aggregation over an eval: paper = rubric root score, run = mean over papers,
seeds = mean ± standard error (np.std(ddof=1)/sqrt(n), complete runs only), per-category
sub-scores, judge failures counted and flagged, and a two-run comparison (JAX-free).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from klong_jax.grading.rubric import (
    CATEGORIES,
    GradedNode,
    aggregate,
    category_scores,
    count_invalid,
    graded_from_dict,
)


def mean_se(values: Sequence[float]) -> dict[str, Any]:
  """{"mean", "se", "n"} as PaperBench's metrics.py; se is None below 2 values, mean None at 0."""
  vals = [float(v) for v in values]
  n = len(vals)
  if n == 0:
    return {"mean": None, "se": None, "n": 0}
  se = float(np.std(vals, ddof=1) / math.sqrt(n)) if n > 1 else None
  return {"mean": float(np.mean(vals)), "se": se, "n": n}


def score_tree(tree: GradedNode | Mapping[str, Any]) -> dict[str, Any]:
  """Scores a graded tree from its leaves: root score, per-category scores and judge failures.

  Internal scores in the input are ignored and recomputed bottom-up with PaperBench's rule.
  `grading_failed` mirrors PaperBench's JudgeOutput.success (every leaf invalid = failed).
  """
  node = tree if isinstance(tree, GradedNode) else graded_from_dict(tree)
  node = aggregate(node)
  n_leaves = sum(1 for _ in node.leaves())
  failures = count_invalid(node)
  return {"score": node.score, "category_scores": category_scores(node),
          "judge_failures": failures, "n_leaves": n_leaves,
          "grading_failed": failures >= n_leaves, "tree": node}


def summarize(results: Sequence[Mapping[str, Any]], task_ids: Sequence[str],
              seeds: Sequence[int]) -> dict[str, Any]:
  """Aggregates per-(task, seed) results into the PaperBench summary.

  Each result needs `task_id`, `seed`, `score`, `category_scores`, `judge_failures`, `n_leaves`
  and optionally `timeline` ([{"cut_s", "score"}]). A seed whose run lacks a paper is incomplete:
  it is listed but left out of the across-seed numbers, as PaperBench does.
  """
  by_pair = {(r["task_id"], int(r["seed"])): r for r in results}
  unknown = sorted({k for k in by_pair if k[0] not in task_ids or k[1] not in seeds})
  if unknown:
    raise ValueError(f"results for pairs outside the eval: {unknown[:5]}")
  papers: dict[str, Any] = {}
  for t in task_ids:
    got = {s: by_pair[(t, s)]["score"] for s in seeds if (t, s) in by_pair}
    papers[t] = {"scores": {str(s): v for s, v in got.items()}, **mean_se(list(got.values()))}
  runs: dict[str, Any] = {}
  complete: list[int] = []
  for s in seeds:
    missing = [t for t in task_ids if (t, s) not in by_pair]
    run: dict[str, Any] = {"complete": not missing, "missing": missing, "score": None,
                           "categories": {}, "timeline": None}
    if not missing:
      complete.append(s)
      rs = [by_pair[(t, s)] for t in task_ids]
      run["score"] = float(np.mean([r["score"] for r in rs]))
      for cat in CATEGORIES:
        vals = [r["category_scores"].get(cat) for r in rs]
        vals = [v for v in vals if v is not None]
        run["categories"][cat] = float(np.mean(vals)) if vals else None
      run["timeline"] = _run_timeline(rs)
    runs[str(s)] = run
  overall = mean_se([runs[str(s)]["score"] for s in complete])
  categories = {cat: mean_se([runs[str(s)]["categories"][cat] for s in complete
                              if runs[str(s)]["categories"][cat] is not None])
                for cat in CATEGORIES}
  timeline = []
  if complete and all(runs[str(s)]["timeline"] for s in complete):
    cuts = [c for c, _ in runs[str(complete[0])]["timeline"]]
    if all([c for c, _ in runs[str(s)]["timeline"]] == cuts for s in complete):
      for i, cut in enumerate(cuts):
        timeline.append({"cut_s": cut, **mean_se([runs[str(s)]["timeline"][i][1]
                                                  for s in complete])})
  failures = [{"task_id": r["task_id"], "seed": int(r["seed"]),
               "judge_failures": int(r["judge_failures"]), "n_leaves": int(r["n_leaves"])}
              for r in results if int(r.get("judge_failures") or 0) > 0]
  return {
      "task_ids": list(task_ids), "seeds": list(seeds), "papers": papers, "runs": runs,
      "complete_seeds": complete, "overall": overall, "categories": categories,
      "timeline": timeline,
      "judge_failures": {"total": sum(f["judge_failures"] for f in failures),
                         "pairs": sorted(failures, key=lambda f: (f["task_id"], f["seed"]))},
      "missing_pairs": [[t, s] for s in seeds for t in task_ids if (t, s) not in by_pair],
      "disqualified": sorted([r["task_id"], int(r["seed"]), r["disqualified"]]
                             for r in results if r.get("disqualified")),
  }


def _run_timeline(rs: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]] | None:
  """Run score (mean over papers) at each budget cut; None when papers disagree on the cuts."""
  lines = [r.get("timeline") or [] for r in rs]
  if not lines or not lines[0]:
    return None
  cuts = [p["cut_s"] for p in lines[0]]
  if any([p["cut_s"] for p in ln] != cuts for ln in lines):
    return None
  return [(c, float(np.mean([ln[i]["score"] for ln in lines]))) for i, c in enumerate(cuts)]


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """B − A with the combined standard error sqrt(se_a² + se_b²) and whether |B − A| exceeds it."""
  if a.get("mean") is None or b.get("mean") is None:
    return {"a": a.get("mean"), "b": b.get("mean"), "diff": None, "se": None,
            "exceeds_se": None}
  diff = b["mean"] - a["mean"]
  se = (math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        if a.get("se") is not None and b.get("se") is not None else None)
  return {"a": a["mean"], "b": b["mean"], "diff": diff, "se": se,
          "exceeds_se": None if se is None else abs(diff) > se + 1e-12}  # A tie does not exceed.


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """Side-by-side of two summaries (e.g. SFT = a, RL = b): overall, per paper, per category,
  and `paired`: B − A over the (paper, seed) pairs both ran (eval/stats.paired_difference: 95%
  paired t and bootstrap intervals, the unpaired Welch interval beside them); None without
  per-pair scores."""
  papers = {t: _diff(a["papers"].get(t, {}), b["papers"].get(t, {}))
            for t in list(dict.fromkeys(list(a["task_ids"]) + list(b["task_ids"])))}
  return {"overall": _diff(a["overall"], b["overall"]), "papers": papers,
          "categories": {c: _diff(a["categories"][c], b["categories"][c]) for c in CATEGORIES},
          "same_tasks": list(a["task_ids"]) == list(b["task_ids"]),
          "paired": _paired(a, b)}


def _paired(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
  from klong_jax.eval.stats import paired_difference  # noqa: PLC0415

  pa = {k: float(v["score"]) for k, v in (a.get("pairs") or {}).items()
        if v.get("score") is not None}
  pb = {k: float(v["score"]) for k, v in (b.get("pairs") or {}).items()
        if v.get("score") is not None}
  if not pa or not pb:
    return None
  return paired_difference(pa, pb, cluster=lambda k: k.rsplit("/", 1)[-1])
