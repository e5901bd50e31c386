"""Grading: PaperBench rubric trees, programmatic checks, LLM judge, blacklist (JAX-free)."""

from klong_jax.grading.grade import GradeResult, grade_submission
from klong_jax.grading.judge import LLMJudge, parse_verdict
from klong_jax.grading.judge_queue import EVAL_PRIORITY, TRAIN_PRIORITY, JudgeQueue
from klong_jax.grading.reproduce import ReproduceResult, run_reproduce, run_reproduce_in
from klong_jax.grading.rubric import (
    CATEGORIES,
    GradedNode,
    RubricError,
    RubricNode,
    aggregate,
    category_scores,
    code_dev_only,
    graded_from_dict,
    load_graded,
    load_rubric,
    report,
    rubric_from_dict,
    save_rubric,
)

__all__ = ["CATEGORIES", "EVAL_PRIORITY", "TRAIN_PRIORITY", "GradeResult", "GradedNode",
           "JudgeQueue", "LLMJudge", "RubricError", "RubricNode", "aggregate", "category_scores",
           "code_dev_only", "grade_submission", "graded_from_dict", "load_graded", "load_rubric",
           "parse_verdict", "report", "ReproduceResult", "rubric_from_dict",
           "run_reproduce", "run_reproduce_in", "save_rubric"]
