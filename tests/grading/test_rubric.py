"""Rubric trees: hand-computed scores, validation errors, PaperBench files, round-trips."""

import copy
import glob
import json

import pytest

from klong_jax.grading import rubric as rb
from tests import refdata

PB = str(refdata.PAPERBENCH)


def leaf(nid, w, cat="Code Development", **kw):
  return {"id": nid, "requirements": f"req {nid}", "weight": w, "sub_tasks": [],
          "task_category": cat, **kw}


def node(nid, w, subs):
  return {"id": nid, "requirements": f"req {nid}", "weight": w, "sub_tasks": subs,
          "task_category": None}


TREE = node("root", 1, [
    node("A", 2, [leaf("a1", 1), leaf("a2", 3, "Code Execution")]),
    node("B", 1, [leaf("b1", 1, "Result Analysis")]),
    leaf("c", 0, "Result Analysis"),
])
SCORES = {"a1": 1.0, "a2": 0.0, "b1": 1.0, "c": 1.0}


def grade(tree, scores):
  return rb.grade_tree(rb.rubric_from_dict(tree), lambda n: (scores[n.id], True, "ok", None))


def test_hand_computed_nested_scores():
  g = grade(TREE, SCORES)
  # A = (1*1 + 0*3)/4 = 0.25; root = (0.25*2 + 1*1 + 1*0)/(2+1+0) = 0.5
  assert g.sub_tasks[0].score == pytest.approx(0.25)
  assert g.score == pytest.approx(0.5)
  cats = rb.category_scores(g)
  assert cats["Code Development"] == pytest.approx(1.0)
  assert cats["Code Execution"] == pytest.approx(0.0)
  # Result Analysis tree: root(B w1 -> 1.0, c w0 -> 1.0) -> (1*1 + 1*0)/1 = 1.0
  assert cats["Result Analysis"] == pytest.approx(1.0)
  g2 = grade(TREE, {**SCORES, "b1": 0.0})
  assert g2.score == pytest.approx(0.5 / 3)


def test_all_zero_weights_score_zero():
  t = node("r", 1, [leaf("x", 0), leaf("y", 0)])
  assert grade(t, {"x": 1.0, "y": 1.0}).score == 0.0


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t["sub_tasks"][0].update(weight=-1), r"'A'.*weight must be >= 0"),
    (lambda t: t["sub_tasks"][1]["sub_tasks"][0].update(id="a1"), r"'a1'.*duplicate id"),
    (lambda t: t["sub_tasks"][2].update(task_category=None), r"'c'.*leaf node has no"),
    (lambda t: t["sub_tasks"][0].update(task_category="Code Development"), r"'A'.*non-leaf"),
    (lambda t: t["sub_tasks"][0].pop("requirements"), r"'A'.*missing required field"),
    (lambda t: t["sub_tasks"][2].update(task_category="Cooking"), r"'c'.*task_category"),
    (lambda t: t["sub_tasks"][2].update(weight="3"), r"'c'.*weight must be a number"),
    (lambda t: t["sub_tasks"][2].update(check={"type": "numeric"}), r"'c'.*expected"),
])
def test_invalid_trees_name_the_node(mutate, match):
  t = copy.deepcopy(TREE)
  mutate(t)
  with pytest.raises(rb.RubricError, match=match):
    rb.rubric_from_dict(t)


def test_cycle_is_an_error():
  t = node("r", 1, [])
  t["sub_tasks"].append(t)
  with pytest.raises(rb.RubricError, match=r"'r'.*cycle"):
    rb.rubric_from_dict(t)


def test_weight_zero_is_legal_and_round_trips(tmp_path):
  r = rb.rubric_from_dict(TREE)
  p = str(tmp_path / "rubric.json")
  rb.save_rubric(r, p)
  assert rb.load_rubric(p) == r
  assert json.load(open(p)) == rb.rubric_from_dict(TREE).to_dict()


@pytest.mark.parametrize("path", sorted(glob.glob(f"{PB}/judge_eval/*/expected_result.json")))
def test_judge_eval_trees_reproduce_stored_scores_exactly(path):
  stored = rb.load_graded(path)
  recomputed = rb.aggregate(stored)

  def same(a, b):
    assert a.score == b.score, (a.id, a.score, b.score)  # exact, not approx
    for x, y in zip(a.sub_tasks, b.sub_tasks, strict=True):
      same(x, y)

  same(stored, recomputed)
  assert recomputed.score == json.load(open(path))["score"]


def test_judge_eval_files_present():
  assert len(glob.glob(f"{PB}/judge_eval/*/expected_result.json")) == 2


@pytest.mark.parametrize("path", sorted(glob.glob(f"{PB}/papers/*/rubric.json")))
def test_real_rubrics_load_round_trip_and_reduce(path, tmp_path):
  raw = json.load(open(path))
  r = rb.load_rubric(path)
  assert r.to_dict() == raw  # PaperBench format round-trips exactly
  cd = rb.code_dev_only(r)
  assert all(leaf.task_category == "Code Development" for leaf in cd.leaves())
  assert 0 < sum(1 for _ in cd.leaves()) < sum(1 for _ in r.leaves())
  rb.rubric_from_dict(cd.to_dict())  # still a valid tree
  g = rb.grade_tree(cd, lambda n: (1.0, True, "", None))
  assert g.score == pytest.approx(1.0)


def test_code_dev_only_of_tree_without_code_leaves_is_single_leaf():
  t = node("r", 1, [leaf("x", 1, "Code Execution")])
  cd = rb.code_dev_only(rb.rubric_from_dict(t))
  assert cd.is_leaf and cd.task_category == "Code Development"


def test_report_shows_scores_and_failures():
  r = rb.rubric_from_dict(TREE)
  g = rb.grade_tree(r, lambda n: (1.0, n.id != "b1", f"because {n.id}", None))
  text = rb.report(g)
  assert "[JUDGE FAILURE]" in text and "because a2" in text and "judge failures: 1" in text
  assert text.splitlines()[0].startswith("- [")
