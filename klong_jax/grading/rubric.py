"""PaperBench rubric trees: load, validate, score, reduce, report, save (JAX-free).

A rubric is a tree of requirements; leaves are graded 0/1 (by a judge or a programmatic check) and
each parent scores the weighted mean of its direct children, exactly as PaperBench's
`score_from_children` does (see shared/paperbench/NOTES.md section 2).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from klong_jax.fileio import atomic_write_text
from klong_jax.grading.checks import CheckError, validate_check

CODE_DEVELOPMENT = "Code Development"
CODE_EXECUTION = "Code Execution"
RESULT_ANALYSIS = "Result Analysis"
SUBTREE = "Subtree"
CATEGORIES = (CODE_DEVELOPMENT, CODE_EXECUTION, RESULT_ANALYSIS)
VALID_TASK_CATEGORIES = CATEGORIES + (SUBTREE,)
VALID_FINEGRAINED_TASK_CATEGORIES = (
    "Environment & Infrastructure Setup", "Dataset and Model Acquisition",
    "Data Processing & Preparation", "Method Implementation", "Experimental Setup",
    "Evaluation, Metrics & Benchmarking", "Logging, Analysis & Presentation")
_REQUIRED_KEYS = ("id", "requirements", "weight", "sub_tasks")


class RubricError(ValueError):
  """An invalid rubric tree; the message names the offending node and the fix."""


@dataclasses.dataclass(frozen=True)
class RubricNode:
  """One requirement; a leaf when `sub_tasks` is empty. `check` is our programmatic-leaf spec."""

  id: str
  requirements: str
  weight: float
  sub_tasks: tuple[RubricNode, ...] = ()
  task_category: str | None = None
  finegrained_task_category: str | None = None
  check: dict[str, Any] | None = None

  @property
  def is_leaf(self) -> bool:
    return not self.sub_tasks

  def leaves(self) -> Iterator[RubricNode]:
    """Yields leaves in depth-first order."""
    if self.is_leaf:
      yield self
    for c in self.sub_tasks:
      yield from c.leaves()

  def walk(self) -> Iterator[RubricNode]:
    yield self
    for c in self.sub_tasks:
      yield from c.walk()

  def to_dict(self) -> dict[str, Any]:
    """PaperBench `TaskNode.to_dict` shape (all 6 keys), plus `check` when set."""
    d: dict[str, Any] = {
        "id": self.id, "requirements": self.requirements, "weight": self.weight,
        "sub_tasks": [c.to_dict() for c in self.sub_tasks],
        "task_category": self.task_category,
        "finegrained_task_category": self.finegrained_task_category}
    if self.check is not None:
      d["check"] = self.check
    return d


@dataclasses.dataclass(frozen=True)
class GradedNode:
  """A rubric node with its grade (PaperBench `GradedTaskNode`)."""

  id: str
  requirements: str
  weight: float
  score: float
  valid_score: bool
  explanation: str
  sub_tasks: tuple[GradedNode, ...] = ()
  task_category: str | None = None
  judge_metadata: dict[str, Any] | None = None

  @property
  def is_leaf(self) -> bool:
    return not self.sub_tasks

  def leaves(self) -> Iterator[GradedNode]:
    if self.is_leaf:
      yield self
    for c in self.sub_tasks:
      yield from c.leaves()

  def to_dict(self) -> dict[str, Any]:
    """PaperBench `GradedTaskNode.to_dict` key order."""
    return {
        "id": self.id, "requirements": self.requirements, "weight": self.weight,
        "score": self.score, "valid_score": self.valid_score,
        "task_category": self.task_category, "explanation": self.explanation,
        "judge_metadata": self.judge_metadata,
        "sub_tasks": [c.to_dict() for c in self.sub_tasks]}


def _check_weight(w: Any, nid: str) -> float:
  if isinstance(w, bool) or not isinstance(w, (int, float)):
    raise RubricError(f"rubric node {nid!r}: weight must be a number, got {w!r}")
  if w < 0 or w != w:
    raise RubricError(f"rubric node {nid!r}: weight must be >= 0, got {w!r}")
  return w


def _parse(d: Any, path: tuple[int, ...], seen_ids: dict[str, str], on_path: set[int],
           graded: bool) -> Any:
  if not isinstance(d, Mapping):
    raise RubricError(f"rubric node at path {list(path)}: expected a JSON object, got "
                      f"{type(d).__name__}")
  nid = d.get("id", f"<unknown at path {list(path)}>")
  if id(d) in on_path:
    raise RubricError(f"rubric node {nid!r}: cycle (the node is its own ancestor)")
  for k in _REQUIRED_KEYS + (("score", "valid_score") if graded else ()):
    if k not in d:
      raise RubricError(f"rubric node {nid!r}: missing required field {k!r}")
  if not isinstance(d["id"], str) or not d["id"]:
    raise RubricError(f"rubric node at path {list(path)}: 'id' must be a non-empty string")
  if nid in seen_ids:
    raise RubricError(f"rubric node {nid!r}: duplicate id (also at path {seen_ids[nid]}); "
                      "give every node a unique id")
  seen_ids[nid] = str(list(path))
  weight = _check_weight(d["weight"], nid)
  subs = d["sub_tasks"]
  if not isinstance(subs, (list, tuple)):
    raise RubricError(f"rubric node {nid!r}: 'sub_tasks' must be a list")
  cat = d.get("task_category")
  if cat and cat not in VALID_TASK_CATEGORIES:
    raise RubricError(f"rubric node {nid!r}: task_category {cat!r} not in "
                      f"{VALID_TASK_CATEGORIES}")
  fine = d.get("finegrained_task_category")
  if not graded and fine and fine not in VALID_FINEGRAINED_TASK_CATEGORIES:
    raise RubricError(f"rubric node {nid!r}: finegrained_task_category {fine!r} not in "
                      f"{VALID_FINEGRAINED_TASK_CATEGORIES}")
  if subs and cat:
    raise RubricError(f"rubric node {nid!r}: non-leaf node cannot have a task category")
  if not subs and not cat:
    raise RubricError(f"rubric node {nid!r}: leaf node has no task_category; set one of "
                      f"{CATEGORIES}")
  on_path.add(id(d))
  children = tuple(_parse(c, path + (i,), seen_ids, on_path, graded) for i, c in enumerate(subs))
  on_path.discard(id(d))
  if graded:
    score = d["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
      raise RubricError(f"rubric node {nid!r}: score must be a number in [0, 1], got {score!r}")
    return GradedNode(
        id=nid, requirements=str(d["requirements"]), weight=weight, score=float(score),
        valid_score=bool(d["valid_score"]), explanation=str(d.get("explanation", "")),
        sub_tasks=children, task_category=cat, judge_metadata=d.get("judge_metadata"))
  check = d.get("check")
  if check is not None:
    if subs:
      raise RubricError(f"rubric node {nid!r}: only leaves may carry a 'check'")
    if not isinstance(check, Mapping) or "type" not in check:
      raise RubricError(f"rubric node {nid!r}: 'check' must be an object with a 'type'")
    try:
      validate_check(check)
    except CheckError as e:
      raise RubricError(f"rubric node {nid!r}: {e}") from None
    check = dict(check)
  return RubricNode(id=nid, requirements=str(d["requirements"]), weight=weight,
                    sub_tasks=children, task_category=cat or None,
                    finegrained_task_category=fine or None, check=check)


def rubric_from_dict(d: Mapping[str, Any]) -> RubricNode:
  """Validates a PaperBench rubric dict into a tree; `RubricError` names the bad node."""
  return _parse(d, (), {}, set(), graded=False)


def graded_from_dict(d: Mapping[str, Any]) -> GradedNode:
  """Reads a PaperBench graded tree (e.g. judge_eval expected_result.json)."""
  return _parse(d, (), {}, set(), graded=True)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise RubricError(f"rubric file {path}: not valid JSON ({e})") from None


def load_rubric(path: str) -> RubricNode:
  """Loads and validates a rubric.json file."""
  try:
    return rubric_from_dict(_read_json(path))
  except RubricError as e:
    raise RubricError(f"{path}: {e}") from None


def load_graded(path: str) -> GradedNode:
  return graded_from_dict(_read_json(path))


def save_rubric(node: RubricNode | GradedNode, path: str) -> None:
  """Saves a rubric or graded tree as JSON (atomic)."""
  atomic_write_text(path, json.dumps(node.to_dict(), indent=2) + "\n")


def score_from_children(children: tuple[GradedNode, ...]) -> float:
  """PaperBench's rule: weighted mean of direct children; all-zero weights -> 0.0."""
  total = sum(c.weight for c in children)
  if total == 0:
    return 0.0
  return sum(c.score * c.weight for c in children) / total


def aggregate(node: GradedNode) -> GradedNode:
  """Recomputes every internal score bottom-up from the leaves."""
  if node.is_leaf:
    return node
  kids = tuple(aggregate(c) for c in node.sub_tasks)
  return dataclasses.replace(node, sub_tasks=kids, score=score_from_children(kids),
                             valid_score=True, explanation="Aggregated score from sub-tasks.",
                             judge_metadata=None)


LeafGrade = tuple[float, bool, str, dict[str, Any] | None]


def grade_tree(rubric: RubricNode, grade_leaf: Callable[[RubricNode], LeafGrade]) -> GradedNode:
  """Grades every leaf with `grade_leaf(leaf) -> (score, valid, explanation, metadata)`."""
  def build(n: RubricNode) -> GradedNode:
    if n.is_leaf:
      score, valid, expl, meta = grade_leaf(n)
      return GradedNode(id=n.id, requirements=n.requirements, weight=n.weight,
                        score=float(score), valid_score=bool(valid), explanation=expl,
                        task_category=n.task_category, judge_metadata=meta)
    return GradedNode(id=n.id, requirements=n.requirements, weight=n.weight, score=0.0,
                      valid_score=True, explanation="", sub_tasks=tuple(build(c) for c in
                                                                       n.sub_tasks))
  return aggregate(build(rubric))


def reduce_to_category(node: Any, category: str) -> Any | None:
  """Keeps only `category` leaves, dropping emptied subtrees (PaperBench reduce_to_category)."""
  if node.is_leaf:
    return node if node.task_category == category else None
  kids = tuple(k for k in (reduce_to_category(c, category) for c in node.sub_tasks)
               if k is not None)
  if not kids:
    return None
  out = dataclasses.replace(node, sub_tasks=kids)
  return aggregate(out) if isinstance(out, GradedNode) else out


def code_dev_only(rubric: RubricNode) -> RubricNode:
  """PaperBench's `code_only()`: Code Development leaves only; an emptied root becomes one leaf."""
  out = reduce_to_category(rubric, CODE_DEVELOPMENT)
  if out is None:
    return dataclasses.replace(rubric, sub_tasks=(), task_category=CODE_DEVELOPMENT, check=None)
  return out


def category_scores(graded: GradedNode) -> dict[str, float | None]:
  """Score of the tree restricted to each category's leaves (None when it has no such leaf)."""
  out: dict[str, float | None] = {}
  for cat in CATEGORIES:
    sub = reduce_to_category(graded, cat)
    out[cat] = None if sub is None else sub.score
  return out


def count_invalid(graded: GradedNode) -> int:
  return sum(1 for leaf in graded.leaves() if not leaf.valid_score)


def report(graded: GradedNode, max_explanation: int = 200) -> str:
  """Readable tree: score, weight, category and the judge's explanation on every leaf."""
  lines: list[str] = []

  def walk(n: GradedNode, depth: int) -> None:
    pad = "  " * depth
    flag = "" if n.valid_score else " [JUDGE FAILURE]"
    cat = f" ({n.task_category})" if n.task_category else ""
    req = " ".join(n.requirements.split())
    lines.append(f"{pad}- [{n.score:.3f}] w={n.weight:g}{cat}{flag} {req}")
    if n.is_leaf and n.explanation:
      expl = " ".join(n.explanation.split())
      if len(expl) > max_explanation:
        expl = expl[:max_explanation] + "..."
      lines.append(f"{pad}    > {expl}")
    for c in n.sub_tasks:
      walk(c, depth + 1)

  walk(graded, 0)
  cats = ", ".join(f"{k}: {'n/a' if v is None else f'{v:.3f}'}"
                   for k, v in category_scores(graded).items())
  lines.append(f"score {graded.score:.4f} | {cats} | judge failures: {count_invalid(graded)}")
  return "\n".join(lines)
