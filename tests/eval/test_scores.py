"""Eval scoring: PaperBench's human-graded trees through the eval score path, seed statistics,
incomplete runs, judge-failure flags, comparison, budget cuts and snapshot choice."""

import copy
import json
import math

import numpy as np
import pytest

from klong_jax.eval import scores, timeline
from tests import refdata

PB = str(refdata.PAPERBENCH)
JUDGE_EVAL = ("semantic-self-consistency", "stay-on-topic-with-classifier-free-guidance")


def _scramble_internal(d):
  """Overwrites every internal score so only the leaves can produce the right root."""
  if d["sub_tasks"]:
    d["score"] = 0.123
    for c in d["sub_tasks"]:
      _scramble_internal(c)


def _internal(d, out):
  if d["sub_tasks"]:
    out[d["id"]] = d["score"]
    for c in d["sub_tasks"]:
      _internal(c, out)
  return out


@pytest.mark.parametrize("paper", JUDGE_EVAL)
def test_human_graded_trees_rescored_from_leaves_match_exactly(paper):
  raw = json.load(open(f"{PB}/judge_eval/{paper}/expected_result.json"))
  stored = _internal(raw, {})
  scrambled = copy.deepcopy(raw)
  _scramble_internal(scrambled)
  res = scores.score_tree(scrambled)
  assert res["score"] == raw["score"]  # exact, not approx
  got = _internal(res["tree"].to_dict(), {})
  assert got == stored  # every internal node, exactly
  assert res["judge_failures"] == 0 and not res["grading_failed"]
  assert res["n_leaves"] == sum(1 for _ in res["tree"].leaves())


def test_judge_eval_roots_are_the_documented_values():
  roots = {p: json.load(open(f"{PB}/judge_eval/{p}/expected_result.json"))["score"]
           for p in JUDGE_EVAL}
  assert roots["semantic-self-consistency"] == pytest.approx(0.91, abs=5e-3)
  assert roots["stay-on-topic-with-classifier-free-guidance"] == pytest.approx(0.48153, abs=1e-5)


def _r(task, seed, score, cats=None, jf=0, n=4, tl=None):
  return {"task_id": task, "seed": seed, "score": score, "judge_failures": jf, "n_leaves": n,
          "category_scores": cats or {"Code Development": score, "Code Execution": None,
                                      "Result Analysis": None},
          "timeline": tl}


A = {0: 0.5, 1: 0.7, 2: 0.9}
B = {0: 0.1, 1: 0.3, 2: 0.2}


def test_summary_paper_run_and_seed_statistics():
  res = [_r("A", s, v) for s, v in A.items()] + [_r("B", s, v) for s, v in B.items()]
  s = scores.summarize(res, ["A", "B"], [0, 1, 2])
  runs = [(A[k] + B[k]) / 2 for k in range(3)]  # 0.3, 0.5, 0.55
  assert [s["runs"][str(k)]["score"] for k in range(3)] == pytest.approx(runs)
  mean = sum(runs) / 3
  se = math.sqrt(sum((x - mean) ** 2 for x in runs) / 2) / math.sqrt(3)  # ddof=1
  assert s["overall"]["mean"] == pytest.approx(mean)
  assert s["overall"]["se"] == pytest.approx(se)
  assert s["overall"]["n"] == 3
  assert s["papers"]["A"]["mean"] == pytest.approx(0.7)
  assert s["papers"]["A"]["se"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1) / math.sqrt(3))
  cd = s["categories"]["Code Development"]
  assert cd["mean"] == pytest.approx(mean)
  assert s["categories"]["Result Analysis"] == {"mean": None, "se": None, "n": 0}
  assert s["missing_pairs"] == [] and s["judge_failures"]["total"] == 0


def test_incomplete_seed_is_left_out_and_listed():
  res = [_r("A", s, v) for s, v in A.items()] + [_r("B", s, v) for s, v in B.items() if s != 2]
  s = scores.summarize(res, ["A", "B"], [0, 1, 2])
  assert s["missing_pairs"] == [["B", 2]]
  assert s["complete_seeds"] == [0, 1]
  assert not s["runs"]["2"]["complete"] and s["runs"]["2"]["missing"] == ["B"]
  assert s["overall"]["mean"] == pytest.approx(0.4)
  assert s["overall"]["se"] == pytest.approx(0.1)  # std([0.3, 0.5], ddof=1)/sqrt(2)
  assert s["papers"]["B"]["n"] == 2


def test_single_seed_has_no_standard_error():
  s = scores.summarize([_r("A", 0, 0.25)], ["A"], [0])
  assert s["overall"] == {"mean": 0.25, "se": None, "n": 1}


def test_judge_failures_counted_and_flagged():
  res = [_r("A", 0, 0.5, jf=2), _r("B", 0, 0.0, jf=4, n=4)]
  s = scores.summarize(res, ["A", "B"], [0])
  assert s["judge_failures"]["total"] == 6
  assert [(p["task_id"], p["judge_failures"]) for p in s["judge_failures"]["pairs"]] == [
      ("A", 2), ("B", 4)]
  g = json.load(open(f"{PB}/judge_eval/semantic-self-consistency/expected_result.json"))
  leaves = []

  def walk(d):
    if not d["sub_tasks"]:
      leaves.append(d)
    for c in d["sub_tasks"]:
      walk(c)

  walk(g)
  for leaf in leaves:
    leaf["valid_score"] = False
  r = scores.score_tree(g)
  assert r["judge_failures"] == len(leaves) and r["grading_failed"]


def test_results_outside_the_eval_are_rejected():
  with pytest.raises(ValueError, match="outside the eval"):
    scores.summarize([_r("Z", 0, 1.0)], ["A"], [0])


def test_timeline_means_over_papers_then_seeds():
  def tl(*vals):
    return [{"cut_s": c, "score": v} for c, v in zip((1.0, 2.0), vals, strict=True)]
  res = [_r("A", 0, 1.0, tl=tl(0.0, 1.0)), _r("B", 0, 0.5, tl=tl(0.5, 0.5)),
         _r("A", 1, 1.0, tl=tl(1.0, 1.0)), _r("B", 1, 0.5, tl=tl(0.5, 0.5))]
  s = scores.summarize(res, ["A", "B"], [0, 1])
  assert [p["cut_s"] for p in s["timeline"]] == [1.0, 2.0]
  assert s["timeline"][0]["mean"] == pytest.approx((0.25 + 0.75) / 2)
  assert s["timeline"][1]["mean"] == pytest.approx(0.75)
  assert s["timeline"][1]["se"] == pytest.approx(0.0)


def test_compare_difference_and_standard_error():
  a = {"task_ids": ["A"], "overall": {"mean": 0.4, "se": 0.03, "n": 3},
       "papers": {"A": {"mean": 0.4, "se": 0.03}},
       "categories": {c: {"mean": None, "se": None} for c in scores.CATEGORIES}}
  b = copy.deepcopy(a)
  b["overall"] = {"mean": 0.5, "se": 0.04, "n": 3}
  b["papers"]["A"] = {"mean": 0.42, "se": 0.04}
  c = scores.compare(a, b)
  assert c["overall"]["diff"] == pytest.approx(0.1)
  assert c["overall"]["se"] == pytest.approx(0.05)  # sqrt(0.03² + 0.04²)
  assert c["overall"]["exceeds_se"] is True
  assert c["papers"]["A"]["exceeds_se"] is False  # 0.02 < 0.05
  assert c["categories"]["Code Development"]["diff"] is None
  assert c["same_tasks"]


@pytest.mark.parametrize("text,want", [("12h", 43200), ("1h30m", 5400), ("90s", 90),
                                       ("45m", 2700), ("600", 600), (120, 120), ("1.5h", 5400)])
def test_parse_budget(text, want):
  assert timeline.parse_budget(text) == want


@pytest.mark.parametrize("bad", ["", "12x", "h", "-5", "0", "1h junk"])
def test_parse_budget_rejects_bad_input(bad):
  with pytest.raises(ValueError, match="budget"):
    timeline.parse_budget(bad)


def test_budget_cuts_match_the_paper_at_12h_and_scale():
  h = 3600.0
  assert timeline.budget_cuts(12 * h) == [h, 2 * h, 4 * h, 8 * h, 12 * h]
  assert timeline.budget_cuts(120) == [10, 20, 40, 80, 120]
  assert timeline.budget_cuts(100, base_s=60) == [60, 100]


def test_pick_sources_uses_newest_commit_before_each_cut():
  cuts = [10, 20, 40, 80, 120]
  commits = [("b", 15.0), ("a", 5.0), ("c", 35.0)]
  assert timeline.pick_sources(cuts, commits, end_s=60) == ["a", "b", "c", "final", "final"]
  assert timeline.pick_sources(cuts, [], end_s=30) == [None, None, "final", "final", "final"]
  # The agent ran past the budget (slow last step): the budget cut still grades the final one.
  assert timeline.pick_sources(cuts, [("a", 5.0)], end_s=130)[-1] == "final"


def test_compare_pairs_papers_and_seeds():
  """Per-(paper, seed) scores both runs have are compared pairwise (paired t interval)."""
  def summ(scores_by_pair):
    return {"task_ids": ["A", "B"], "overall": {"mean": None, "se": None, "n": 0}, "papers": {},
            "categories": {c: {"mean": None, "se": None} for c in scores.CATEGORIES},
            "pairs": {k: {"score": v} for k, v in scores_by_pair.items()}}
  a = summ({"A/0": 0.2, "A/1": 0.6, "B/0": 0.4, "B/1": 0.9})
  b = summ({"A/0": 0.3, "A/1": 0.7, "B/0": 0.5, "B/1": 1.0, "B/2": 0.0})
  p = scores.compare(a, b)["paired"]
  assert p["n_pairs"] == 4 and p["only_b"] == 1
  assert p["paired_t"]["mean"] == pytest.approx(0.1)
  assert p["paired_t"]["hi"] - p["paired_t"]["lo"] == pytest.approx(0.0, abs=1e-9)
  assert p["welch"]["hi"] - p["welch"]["lo"] > 0.5  # the unpaired one cannot tell
  assert scores.compare({**a, "pairs": {}}, b)["paired"] is None
