"""Tiny eval on the bundled offline mini-papers (programmatic rubric leaves, no LLM judge).

  python -m klong_jax.eval --config=configs/eval_tiny.py --server=URL --out=runs/eval_tiny

Arg string (comma-separated key=value, all optional): `tasks=N` (first N held-out bundled tasks,
default 2), `seeds=2`, `budget=2m`, `backend=docker|local`. Any field can be overridden by a flag.
"""

import os

import ml_collections

from configs import common


def _bundled_tasks() -> str:
  # Path only (no klong_jax import): configs stay loadable anywhere.
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "klong_jax",
                      "tasks", "data")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny eval; see the module docstring for the arg string."""
  args = common.parse_arg(arg, tasks=2, seeds=2, budget="2m", backend="docker")
  config = ml_collections.ConfigDict()
  config.tasks = _bundled_tasks()
  config.split = "heldout"                     # "" = every split.
  config.task_ids = []                         # Empty = all (of the split).
  config.max_tasks = args.tasks  # First N task dirs after filtering; 0 = all.
  config.budget = args.budget     # Text: "12h", "90m", "600s".
  config.seeds = args.seeds
  config.variant = "full"                      # "full" or "code_dev".
  config.workers = 1
  config.backend = args.backend
  config.model = "policy"
  config.max_steps = 12
  config.reproduce_timeout_s = 60.0
  config.judge_url = ""                        # Bundled leaves are programmatic checks.
  config.judge_model = "judge"
  config.grade_snapshots = True
  config.limits = ml_collections.ConfigDict({"mem_bytes": 512 << 20, "pids": 128})
  return config
