"""PaperBench-compatible evaluation: resumable (task, seed) runner, scores, reports (JAX-free)."""

from klong_jax.eval.report import write_reports
from klong_jax.eval.runner import EvalConfig, EvalError, load_eval_tasks, run_eval, write_summary
from klong_jax.eval.scores import compare, mean_se, score_tree, summarize
from klong_jax.eval.timeline import budget_cuts, parse_budget, pick_sources

__all__ = ["EvalConfig", "EvalError", "budget_cuts", "compare", "load_eval_tasks", "mean_se",
           "parse_budget", "pick_sources", "run_eval", "score_tree", "summarize",
           "write_reports", "write_summary"]
