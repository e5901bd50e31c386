"""Grade one submission against a task's rubric: programmatic leaves in the sandbox, the rest by a
judge, blacklist disqualification, reproduce.sh run (JAX-free)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from klong_jax.grading import blacklist as blacklist_lib
from klong_jax.grading.checks import run_check
from klong_jax.grading.judge_queue import TRAIN_PRIORITY
from klong_jax.grading.reproduce import run_reproduce
from klong_jax.grading.rubric import (
    GradedNode,
    LeafGrade,
    RubricNode,
    aggregate,
    category_scores,
    code_dev_only,
    count_invalid,
    grade_tree,
)

DEFAULT_REPRODUCE_TIMEOUT_S = 600.0
DISQUALIFIED_EXPLANATION = "Submission has been disqualified"


@dataclasses.dataclass
class GradeResult:
  """Outcome of grading one submission; `score` is the rubric root score."""

  score: float
  tree: GradedNode
  category_scores: dict[str, float | None]
  judge_failures: int
  disqualified: str | None = None
  reproduce: dict[str, Any] | None = None

  def to_dict(self) -> dict[str, Any]:
    return {"score": self.score, "category_scores": self.category_scores,
            "judge_failures": self.judge_failures, "disqualified": self.disqualified,
            "reproduce": self.reproduce, "tree": self.tree.to_dict()}


def _disqualify(tree: GradedNode, reason: str) -> GradedNode:
  def zero(n: GradedNode) -> GradedNode:
    if n.is_leaf:
      return dataclasses.replace(n, score=0.0, valid_score=True,
                                 explanation=f"{DISQUALIFIED_EXPLANATION}: {reason}")
    return dataclasses.replace(n, sub_tasks=tuple(zero(c) for c in n.sub_tasks))
  return aggregate(zero(tree))


def grade_submission(task: Any, sandbox: Any, submission_dir: str, reproduce_result: Any = None,
                     judge: Any = None, *, commands: Iterable[str] = (),
                     host_submission_dir: str | None = None, code_dev: bool = False,
                     run_reproduce_if_missing: bool = True,
                     reproduce_timeout_s: float | None = None,
                     priority: int | tuple = TRAIN_PRIORITY) -> GradeResult:
  """Grades `submission_dir` (a path inside `sandbox`) against `task.rubric`.

  Programmatic leaves (`check`) run in the sandbox; other leaves go to `judge.grade_leaves(...)`
  (e.g. `LLMJudge`), or count as judge failures when no judge is given (never silently 0).
  `priority` orders judge requests (EVAL_PRIORITY before TRAIN_PRIORITY; a tuple such as
  (TRAIN_PRIORITY, group_index) puts older groups first). `commands` are the agent's recorded
  commands, scanned with the files for blacklisted fetches.
  `host_submission_dir` is where the judge and blacklist scan read files (default: same path,
  or a `ReproduceResult`'s output_dir). `reproduce_result` is an ExecResult or a ReproduceResult;
  when None, reproduce.sh is run here in `sandbox` (unless code_dev).
  Result Analysis leaves (and checks with `"fresh": true`) only count files the reproduce run
  wrote, PaperBench's mtime rule: a ReproduceResult's `started_at` (None: reproduce.sh never
  ran, so they score 0) or the run made here. A bare ExecResult carries no start time, so the
  rule is not applied to it.
  """
  rubric: RubricNode | None = getattr(task, "rubric", None)
  if rubric is None:
    raise ValueError(f"task {getattr(task, 'id', '?')!r} has no rubric; add rubric.json")
  if code_dev:
    rubric = code_dev_only(rubric)
  host_dir = host_submission_dir or submission_dir
  reproduce = reproduce_result
  fresh_rule = True  # False: the reproduce start is unknown (a bare ExecResult).
  started_at = None
  if reproduce is not None and hasattr(reproduce, "result"):  # rollout.sandbox.ReproduceResult
    host_dir = host_submission_dir or getattr(reproduce, "output_dir", None) or submission_dir
    started_at = getattr(reproduce, "started_at", None)
    reproduce = reproduce.result
  elif reproduce is not None:
    fresh_rule = False
  if reproduce is None and run_reproduce_if_missing and not code_dev:
    timeout = reproduce_timeout_s or float(
        getattr(task, "config", {}).get("reproduce_timeout_s", DEFAULT_REPRODUCE_TIMEOUT_S))
    started_at = time.time()
    reproduce = run_reproduce(sandbox, submission_dir, timeout, started_at)
    if reproduce is None:
      started_at = None

  leaf_grades: dict[str, LeafGrade] = {}
  judged: list[RubricNode] = []
  for leaf in rubric.leaves():
    if leaf.check is None:
      judged.append(leaf)
      continue
    try:
      fresh = fresh_rule and bool(
          leaf.check.get("fresh", leaf.task_category == "Result Analysis"))
      score, expl = run_check(leaf.check, sandbox, submission_dir, reproduce, fresh=fresh,
                              reproduce_started_at=started_at)
      leaf_grades[leaf.id] = (score, True, expl, {"check": leaf.check["type"]})
    except Exception as e:  # noqa: BLE001 - a sandbox failure marks the leaf, it is not a 0
      logging.warning("check for leaf %s failed: %r", leaf.id, e)
      leaf_grades[leaf.id] = (0.0, False, f"check error: {e!r}", None)
  if judged:
    if judge is None:
      for leaf in judged:
        leaf_grades[leaf.id] = (0.0, False, "judge failure: no judge configured for this "
                                "non-programmatic leaf", None)
    else:
      leaf_grades.update(judge.grade_leaves(
          task=task, rubric=rubric, leaves=judged, submission_dir=host_dir,
          reproduce_log=None if reproduce is None else reproduce.output, priority=priority,
          code_dev=code_dev))
  tree = grade_tree(rubric, lambda leaf: leaf_grades[leaf.id])

  reason = blacklist_lib.find_violation(getattr(task, "blacklist", []) or [], commands, host_dir)
  if reason:
    tree = _disqualify(tree, reason)
  repro = None if reproduce is None else {
      "exit_code": reproduce.exit_code, "timed_out": reproduce.timed_out,
      "duration_s": getattr(reproduce, "duration_s", None)}
  return GradeResult(score=tree.score, tree=tree, category_scores=category_scores(tree),
                     judge_failures=count_invalid(tree), disqualified=reason, reproduce=repro)
