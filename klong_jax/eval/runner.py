"""The resumable eval loop: every (task, seed) pair is run, graded and written atomically, so a
killed eval continues where it stopped and never re-runs a finished pair (JAX-free).

Output layout under `out`:
  eval_config.json                 settings; a resume with different result-changing ones is refused
  runs/<task_id>/seed<k>/          a FINISHED pair (renamed into place from a temp dir when done):
      result.json, graded_tree.json, graded_tree.md, submission/, trajectory.json, snapshots/<sha>/
  runs/<task_id>/seed<k>.error.json  the last infra failure of a pair that is still unfinished
  summary.json, report.md, report.html
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

from absl import logging

from klong_jax.eval import pair as pair_lib
from klong_jax.eval import scores as scores_lib
from klong_jax.fileio import atomic_write_text
from klong_jax.grading.rubric import code_dev_only, rubric_from_dict
from klong_jax.rollout import episode_config
from klong_jax.rollout.episode_config import ROLE_DEFAULTS, EpisodeConfig
from klong_jax.tasks import Task, TaskError, list_tasks, load_task

VARIANTS = ("full", "code_dev")
# Settings that change results: a resumed eval must keep them (the server URL may change).
RESUME_KEYS = ("budget_s", "variant", "split", "model", "max_steps", "context_tokens",
               "max_completion_tokens", "judge_model", "grade_snapshots")
_TMP = ".tmp-"


class EvalError(ValueError):
  """A bad eval setting or output dir; the message names it and the fix."""


@dataclasses.dataclass
class EvalConfig:
  """Everything one eval run needs; `python -m klong_jax.eval` fills it from a config + flags."""

  tasks: str
  server: str
  out: str
  seeds: int = 3
  variant: str = "full"
  task_ids: tuple[str, ...] = ()
  split: str = ""                      # "" = every split; else train | rl | heldout.
  max_tasks: int = 0                   # First N selected task dirs; 0 = all.
  workers: int = 1
  api_key: str = "EMPTY"
  judge_url: str = ""
  judge_model: str = "judge"
  judge_api_key: str = "EMPTY"
  judge_concurrency: int = 8
  grade_snapshots: bool = True
  infra_retries: int = 2               # Whole-pair retries after an infra error.
  infra_backoff_s: float = 5.0
  # The agent episode (the one EpisodeConfig, eval role defaults): the budget is its time limit.
  episode: EpisodeConfig = ROLE_DEFAULTS["eval"]

  @classmethod
  def from_fields(cls, **fields: Any) -> EvalConfig:
    """From flat fields (a config file's or the flags' names): EpisodeConfig fields, and
    `budget_s` (= the episode's time limit), go to `episode`."""
    if "budget_s" in fields:
      fields["time_limit_s"] = float(fields.pop("budget_s"))
    rest, episode = episode_config.split_fields("eval", fields)
    return cls(**rest, episode=episode)

  @property
  def budget_s(self) -> float:
    return self.episode.time_limit_s

  def validate(self) -> None:
    if self.variant not in VARIANTS:
      raise EvalError(f"variant {self.variant!r} must be one of {VARIANTS}")
    for name in ("seeds", "workers"):
      if int(getattr(self, name)) < 1:
        raise EvalError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.budget_s > 0:
      raise EvalError(f"budget_s must be > 0, got {self.budget_s}")
    for name in ("tasks", "out"):
      if not getattr(self, name):
        raise EvalError(f"--{name} is required")

  def settings(self) -> pair_lib.PairSettings:
    return pair_lib.PairSettings(episode=self.episode, variant=self.variant,
                                 grade_snapshots=self.grade_snapshots)

  def to_json(self) -> dict[str, Any]:
    """Flat (as eval_config.json has always been): the episode's fields at the top level."""
    d = dataclasses.asdict(self)
    d.pop("api_key")
    d.pop("judge_api_key")
    episode = d.pop("episode")
    episode["limits"] = dict(self.episode.limits)
    d["budget_s"] = episode.pop("time_limit_s")
    d.update(episode)
    d["task_ids"] = list(self.task_ids)
    return d


def safe_name(task_id: str) -> str:
  """A task id as one path component."""
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", task_id).strip(".")
  if not name:
    raise EvalError(f"task id {task_id!r} gives an empty directory name; set a plain id")
  return name


def load_eval_tasks(root: str, task_ids: Sequence[str] = (), variant: str = "full",
                    split: str = "", max_tasks: int = 0) -> list[Task]:
  """Loads task dirs (PaperBench layout or ours) under `root`: optionally one split, only
  `task_ids`, only the first `max_tasks`.

  An id matches the config.yaml id or the folder name (they may differ, as in PaperBench).
  Every selected task needs a rubric; with variant code_dev its reduction must be a valid tree.
  """
  if variant not in VARIANTS:
    raise EvalError(f"variant {variant!r} must be one of {VARIANTS}")
  try:
    dirs = list_tasks(root, split or None)
  except TaskError as e:
    raise EvalError(str(e)) from None
  tasks, wanted, unmatched = [], set(task_ids), set(task_ids)
  for d in dirs:
    t = load_task(d, require_rubric=False)
    if wanted and not {t.id, os.path.basename(d)} & wanted:
      continue
    unmatched -= {t.id, os.path.basename(d)}
    if t.rubric is None:
      raise EvalError(f"task {t.id!r} ({d}) has no rubric.json; add one, or leave it out with "
                      "--task_ids")
    if variant == "code_dev":
      rubric_from_dict(code_dev_only(t.rubric).to_dict())
    tasks.append(t)
  if unmatched:
    raise EvalError(f"task ids {sorted(unmatched)} not found under {root}"
                    + (f" (split {split})" if split else ""))
  if max_tasks > 0:
    tasks = tasks[:max_tasks]
  if not tasks:
    raise EvalError(f"no tasks found under {root} (a task dir holds config.yaml or rubric.json)")
  seen: dict[str, str] = {}
  for t in tasks:
    name = safe_name(t.id)
    if name in seen:
      raise EvalError(f"tasks {seen[name]} and {t.path} share the id {t.id!r}; ids must be unique")
    seen[name] = t.path
  return tasks


def pair_dir(out: str, task_id: str, seed: int) -> str:
  return os.path.join(out, "runs", safe_name(task_id), f"seed{seed}")


def is_finished(out: str, task_id: str, seed: int) -> bool:
  return os.path.exists(os.path.join(pair_dir(out, task_id, seed), "result.json"))


def load_results(out: str, tasks: Sequence[Task], seeds: Sequence[int]) -> list[dict[str, Any]]:
  """result.json of every finished pair."""
  results = []
  for s in seeds:
    for t in tasks:
      p = os.path.join(pair_dir(out, t.id, s), "result.json")
      if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
          results.append(json.load(f))
  return results


class _Lock:
  """An exclusive flock on out/.lock: two evals never write one output dir at once."""

  def __init__(self, out: str):
    self.path = os.path.join(out, ".lock")
    self.fd = -1

  def __enter__(self) -> _Lock:
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise EvalError(f"another eval is running in {os.path.dirname(self.path)}; wait for it or "
                      "use another --out") from None
    return self

  def __exit__(self, *exc: object) -> None:
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _check_config(out: str, cfg: EvalConfig) -> None:
  path = os.path.join(out, "eval_config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    new = cfg.to_json()
    bad = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if bad:
      diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad)
      raise EvalError(f"{out} holds an eval with other settings ({diffs}); resume with the same "
                      "settings or pick a new --out")
  atomic_write_text(path, json.dumps(cfg.to_json(), indent=2) + "\n")


def _clean_stale(out: str) -> int:
  """Removes temp pair dirs left by a killed eval (we hold the lock, so none is live)."""
  n = 0
  runs = os.path.join(out, "runs")
  for dirpath, dirnames, _ in os.walk(runs):
    for d in list(dirnames):
      if d.startswith(_TMP):
        shutil.rmtree(os.path.join(dirpath, d), ignore_errors=True)
        dirnames.remove(d)
        n += 1
  return n


def _is_infra(e: BaseException) -> bool:
  from klong_jax.agent.client import InfraError
  from klong_jax.sandbox.base import SandboxError
  return isinstance(e, (InfraError, SandboxError, OSError))


def run_one(task: Task, seed: int, cfg: EvalConfig, client: Any, judge: Any) -> bool:
  """Runs one pair with infra retries; True when finished (result.json in place)."""
  final = pair_dir(cfg.out, task.id, seed)
  err_path = final + ".error.json"
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  for attempt in range(cfg.infra_retries + 1):
    tmp = os.path.join(parent, f"{_TMP}seed{seed}-{os.getpid()}-{attempt}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      result = pair_lib.run_pair(task, seed, cfg.settings(), client, judge, tmp)
    except Exception as e:  # noqa: BLE001 - infra errors retry; anything else stops the eval
      shutil.rmtree(tmp, ignore_errors=True)
      if not _is_infra(e):
        raise
      logging.warning("eval: %s seed %d: infra failure (attempt %d): %s", task.id, seed,
                      attempt + 1, e)
      atomic_write_text(err_path, json.dumps({"error": repr(e)[:4000], "attempt": attempt + 1,
                                              "time": time.time()}) + "\n")
      if attempt < cfg.infra_retries:
        time.sleep(cfg.infra_backoff_s * 2 ** attempt)
      continue
    result["server"] = cfg.server
    atomic_write_text(os.path.join(tmp, "result.json"), json.dumps(result, indent=2) + "\n")
    os.rename(tmp, final)  # The pair becomes visible as finished in one step.
    if os.path.exists(err_path):
      os.unlink(err_path)
    logging.info("eval: %s seed %d: score %.4f (%s, %d judge failures)", task.id, seed,
                 result["score"], result["status"], result["judge_failures"])
    return True
  return False


def make_judge(cfg: EvalConfig) -> Any:
  """The LLM judge for non-programmatic leaves, or None (those leaves then count as failures)."""
  if not cfg.judge_url:
    return None
  from klong_jax.grading.judge import LLMJudge
  return LLMJudge(base_url=cfg.judge_url, model=cfg.judge_model, api_key=cfg.judge_api_key,
                  max_concurrency=cfg.judge_concurrency)


def run_eval(cfg: EvalConfig, client: Any = None, judge: Any = None) -> dict[str, Any]:
  """Runs every unfinished (task, seed) pair, then writes summary.json; returns the summary."""
  cfg.validate()
  tasks = load_eval_tasks(cfg.tasks, cfg.task_ids, cfg.variant, cfg.split, cfg.max_tasks)
  os.makedirs(cfg.out, exist_ok=True)
  with _Lock(cfg.out):
    _check_config(cfg.out, cfg)
    stale = _clean_stale(cfg.out)
    if stale:
      logging.info("eval: removed %d unfinished pair dir(s) of a killed run", stale)
    seeds = list(range(cfg.seeds))
    todo = [(t, s) for s in seeds for t in tasks if not is_finished(cfg.out, t.id, s)]
    logging.info("eval: %d tasks x %d seeds; %d finished, %d to run", len(tasks), len(seeds),
                 len(tasks) * len(seeds) - len(todo), len(todo))
    if todo:
      if client is None:
        from klong_jax.agent.client import make_client
        client = make_client(cfg.server, api_key=cfg.api_key)
      judge = judge if judge is not None else make_judge(cfg)
      with concurrent.futures.ThreadPoolExecutor(cfg.workers) as ex:
        futs = [ex.submit(run_one, t, s, cfg, client, judge) for t, s in todo]
        for f in futs:
          f.result()
    return write_summary(cfg.out, tasks, seeds)


def write_summary(out: str, tasks: Sequence[Task], seeds: Sequence[int]) -> dict[str, Any]:
  """Aggregates the finished pairs into out/summary.json (atomic) and returns it."""
  results = load_results(out, tasks, seeds)
  summary = scores_lib.summarize(results, [t.id for t in tasks], list(seeds))
  summary["pairs"] = {f"{r['task_id']}/{r['seed']}": {
      k: r.get(k) for k in ("score", "status", "end_reason", "judge_failures", "n_leaves",
                            "grading_failed", "disqualified", "submit_time_s", "category_scores")}
      | {"dir": os.path.relpath(pair_dir(out, r["task_id"], int(r["seed"])), out)}
      for r in results}
  cfg_path = os.path.join(out, "eval_config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      summary["config"] = json.load(f)
  summary["titles"] = {t.id: t.title for t in tasks}
  atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
  return summary
