"""PaperBench-style evaluation of a policy endpoint: agent runs, fresh-container reproduce, grading,
summary and reports. Resumable: re-running the same command continues a killed eval.

  python -m klong_jax.eval --tasks=DIR --server=URL --budget=12h --seeds=3 --out=DIR \\
      [--variant=full|code_dev] [--compare=OTHER_OUT] [--judge_url=URL --judge_model=M]
  python -m klong_jax.eval --config=configs/eval_tiny.py --server=URL --out=DIR
  python -m klong_jax.eval --out=DIR --compare=OTHER_OUT --report_only   # reports only

A config file (`get_config()` returning a ConfigDict with EvalConfig fields, `budget` as text)
sets defaults; flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from klong_jax.eval import report as report_lib
from klong_jax.eval import runner
from klong_jax.eval.timeline import parse_budget
from klong_jax.rollout import episode_config

_CONFIG: Any = None

FLAGS = flags.FLAGS
_FIELDS = ("tasks", "server", "out", "budget", "seeds", "variant", "task_ids", "split",
           "max_tasks", "workers", "judge_url", "judge_model", "grade_snapshots",
           *(n for n in episode_config.FLAG_NAMES if n not in ("time_limit_s", "sandbox_limits")))


def build_config() -> runner.EvalConfig:
  """EvalConfig from the config file (if any) with command-line flags overriding it."""
  base = {} if _CONFIG.value is None else dict(_CONFIG.value.to_dict())
  for name in _FIELDS:
    if FLAGS[name].present or name not in base:
      base[name] = FLAGS[name].value
  if FLAGS["sandbox_limits"].present or "limits" not in base:
    base["limits"] = episode_config.parse_limits(FLAGS.sandbox_limits)
  known = ({f for f in runner.EvalConfig.__dataclass_fields__} | {"budget"}
           | {f.name for f in dataclasses.fields(episode_config.EpisodeConfig)})
  bad = sorted(set(base) - known)
  if bad:
    raise app.UsageError(f"unknown eval config field(s) {bad}; known: {sorted(known)}")
  try:
    base["budget_s"] = parse_budget(base.pop("budget"))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  base["task_ids"] = tuple(base.get("task_ids") or ())
  base["limits"] = dict(base.get("limits") or {})
  base.setdefault("api_key", os.environ.get("KLONG_API_KEY", "EMPTY"))
  base.setdefault("judge_api_key", os.environ.get("OPENAI_API_KEY", "EMPTY"))
  return runner.EvalConfig.from_fields(**base)


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other entry points never clashes on flag names)."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Eval config file (optional).")
  flags.DEFINE_string("tasks", None, "Directory of task dirs (PaperBench layout or ours).")
  flags.DEFINE_string("server", None, "Policy endpoint: OpenAI-compatible base URL (…/v1).")
  flags.DEFINE_string("out", None, "Output dir (results, summary, reports); resumable.")
  flags.DEFINE_string("budget", "12h", "Agent time budget per task: 12h, 90m, 600s, or seconds.")
  flags.DEFINE_integer("seeds", 3, "Independent runs per task.")
  flags.DEFINE_enum("variant", "full", list(runner.VARIANTS), "Rubric variant.")
  flags.DEFINE_list("task_ids", [], "Only these task ids (config id or folder name).")
  flags.DEFINE_string("split", "", "Only tasks of this split (train|rl|heldout); empty = all.")
  flags.DEFINE_integer("max_tasks", 0, "Only the first N selected tasks; 0 = all.")
  flags.DEFINE_integer("workers", 1, "(task, seed) pairs run in parallel.")
  flags.DEFINE_string("judge_url", "", "LLM judge endpoint for non-programmatic leaves.")
  flags.DEFINE_string("judge_model", "judge", "LLM judge model name.")
  flags.DEFINE_bool("grade_snapshots", True, "Grade git commits at budget cuts (score vs time).")
  flags.DEFINE_string("compare", None, "Another eval's out dir to put side by side in the report.")
  flags.DEFINE_bool("report_only", False, "Rebuild summary and reports from finished pairs only.")
  # The episode flags (eval role defaults); the time limit is --budget.
  episode_config.define_flags("eval", exclude=("time_limit_s",))


def main(argv: list[str]) -> None:
  del argv
  cfg = build_config()
  if not cfg.out:
    raise app.UsageError("--out is required")
  try:
    summary = _report_only(cfg) if FLAGS.report_only else _run(cfg)
  except runner.EvalError as e:
    raise app.UsageError(str(e)) from None
  md, html_path = report_lib.write_reports(cfg.out, summary, FLAGS.compare)
  logging.info("eval: score %s %% -> %s, %s", report_lib.pm(summary["overall"]), md, html_path)
  print(f"score {report_lib.pm(summary['overall'])} % | report {html_path}")
  if summary["missing_pairs"]:
    print(f"{len(summary['missing_pairs'])} pair(s) unfinished; re-run the same command to "
          "resume", file=sys.stderr)
    sys.exit(1)


def _run(cfg: runner.EvalConfig) -> dict:
  if not cfg.server:
    raise app.UsageError("--server is required (or --report_only)")
  return runner.run_eval(cfg)


def _report_only(cfg: runner.EvalConfig) -> dict:
  """Summary from finished pairs only; the task set comes from the eval's eval_config.json."""
  saved = os.path.join(cfg.out, "eval_config.json")
  if os.path.exists(saved):
    with open(saved, encoding="utf-8") as f:
      old = json.load(f)
    for name in ("tasks", "task_ids", "seeds", "variant", "split", "max_tasks"):
      if not FLAGS[name].present and name in old:
        setattr(cfg, name, tuple(old[name]) if name == "task_ids" else old[name])
  cfg.validate()
  tasks = runner.load_eval_tasks(cfg.tasks, cfg.task_ids, cfg.variant, cfg.split, cfg.max_tasks)
  return runner.write_summary(cfg.out, tasks, list(range(cfg.seeds)))


def entry() -> None:
  """Console-script entry point (klong-eval)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  entry()
