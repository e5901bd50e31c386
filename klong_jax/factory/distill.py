"""Distill: run a teacher endpoint through the real agent scaffold + sandbox on tasks, grade,
keep trajectories scoring >= a threshold, and write SFT shards (one ArrayRecord shard per task).

Trajectories keep each assistant turn's `reasoning_content` (a thinking teacher's reasoning, as
the agent client received it); the state counts the kept turns that carry it, so a teacher
endpoint whose reasoning is lost (e.g. no reasoning parser) shows up as 0.

Resumable and idempotent: `distill_state.json` (atomic) records finished tasks; a task's shard is
published atomically before it is marked, and a re-run rewrites it under the same name, so no
trajectory is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging

from klong_jax.grading.rubric import atomic_write_text
from klong_jax.rollout import episode_config
from klong_jax.rollout.episode_config import ROLE_DEFAULTS, EpisodeConfig

STATE_FILE = "distill_state.json"
SFT_SUBDIR = "sft"


@dataclasses.dataclass
class DistillConfig:
  """Where tasks, teacher and outputs are, and how many episodes to keep."""

  tasks: str
  server: str
  out: str
  tokenizer: str
  episodes_per_task: int = 2
  threshold: float = 0.5
  split: str | None = "train"
  max_tasks: int = 0
  # The teacher's episodes (the one EpisodeConfig, distill role defaults); its context policy is
  # the student's, so the SFT chunks are the contexts each action was taken under.
  episode: EpisodeConfig = ROLE_DEFAULTS["distill"]

  @classmethod
  def from_fields(cls, **fields: Any) -> DistillConfig:
    """From flat fields: the EpisodeConfig ones go to `episode` (distill role defaults)."""
    rest, ep = episode_config.split_fields("distill", fields)
    return cls(**rest, episode=ep)


def score_histogram(scores: list[float], bins: int = 10) -> list[int]:
  """Counts of scores in [0, 1] over `bins` equal bins (1.0 falls in the last)."""
  counts = [0] * bins
  for s in scores:
    counts[min(bins - 1, max(0, int(s * bins)))] += 1
  return counts


def format_histogram(scores: list[float], bins: int = 10, width: int = 40) -> str:
  counts = score_histogram(scores, bins)
  top = max(counts) or 1
  lines = [f"score histogram (n={len(scores)}, mean={sum(scores) / max(1, len(scores)):.3f})"]
  for i, c in enumerate(counts):
    lines.append(f"  [{i / bins:.1f}, {(i + 1) / bins:.1f}{']' if i == bins - 1 else ')'} "
                 f"{'#' * round(width * c / top):<{width}} {c}")
  return "\n".join(lines)


INFRA_FAIL_FAST = 3  # Stop after this many infra-only tasks when none has been graded yet.


class DistillInfraError(RuntimeError):
  """Some tasks got no graded episode (sandbox, server or image missing); re-run to resume."""


def reasoning_turns(messages: list[dict[str, Any]]) -> int:
  """Assistant turns of a trajectory that carry the model's reasoning."""
  return sum(1 for m in messages if m.get("role") == "assistant" and m.get("reasoning_content"))


def _load_state(path: str) -> dict[str, Any]:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return {"tasks": {}}


def distill(cfg: DistillConfig) -> dict[str, Any]:
  """Runs the stage; returns {"scores", "kept", "reasoning_turns", "shards", "histogram"} over
  all finished tasks."""
  from klong_jax.data.shards import ShardWriter  # noqa: PLC0415
  from klong_jax.rollout.worker import Worker, WorkerConfig  # noqa: PLC0415
  from klong_jax.tasks import list_tasks, load_task  # noqa: PLC0415

  os.makedirs(cfg.out, exist_ok=True)
  state_path = os.path.join(cfg.out, STATE_FILE)
  state = _load_state(state_path)
  worker = Worker(WorkerConfig(
      server=cfg.server, tasks=cfg.tasks, stream=os.path.join(cfg.out, ".stream"),
      tokenizer=cfg.tokenizer, worker="distill", episode=cfg.episode))
  dirs = list_tasks(cfg.tasks, cfg.split)
  if cfg.max_tasks:
    dirs = dirs[:cfg.max_tasks]
  infra: dict[str, str] = {}  # Tasks whose every episode failed on infrastructure: not done.
  graded = 0
  for d in dirs:
    task = load_task(d)
    if task.id in state["tasks"]:
      continue
    if len(infra) >= INFRA_FAIL_FAST and not graded:
      break  # The first tasks all failed the same way: the setup is broken, not the tasks.
    records, scores, statuses, reasoning = [], [], [], 0
    for i in range(cfg.episodes_per_task):
      r = worker.rollout_with_retries(task, 0, cfg.episode.time_limit_s)
      statuses.append(r["status"])
      if r["reward"] is None:
        continue
      scores.append(float(r["reward"]))
      if r["reward"] >= cfg.threshold:
        records.append(worker.to_record(r, task.id, f"distill-{task.id}", 0, i, 0))
        reasoning += reasoning_turns(r["messages"])
    if not scores and all(st == "infra_error" for st in statuses):
      infra[task.id] = str((r.get("metadata") or {}).get("error", "infra_error"))
      logging.warning("distill %s: infra failures only; left for the next run", task.id)
      continue
    graded += 1
    shard = None
    if records:
      shard = os.path.join(cfg.out, SFT_SUBDIR, f"{task.id}.array_record")
      with ShardWriter(shard) as w:
        for rec in records:
          w.write(rec)
    state["tasks"][task.id] = {"scores": scores, "statuses": statuses, "kept": len(records),
                               "reasoning_turns": reasoning, "shard": shard}
    atomic_write_text(state_path, json.dumps(state, indent=2) + "\n")
    logging.info("distill %s: scores %s, kept %d (%d turns with reasoning)", task.id, scores,
                 len(records), reasoning)
  if infra:
    first = next(iter(infra.items()))
    raise DistillInfraError(
        f"distill: {len(infra)} task(s) failed on infrastructure only (e.g. {first[0]}: "
        f"{first[1][:500]}); fix that and re-run the same command: the {len(state['tasks'])} "
        f"finished task(s) in {state_path} are kept, not redone")
  all_scores = [s for t in state["tasks"].values() for s in t["scores"]]
  return {"scores": all_scores, "kept": sum(t["kept"] for t in state["tasks"].values()),
          "reasoning_turns": sum(t.get("reasoning_turns", 0) for t in state["tasks"].values()),
          "shards": sorted(t["shard"] for t in state["tasks"].values() if t["shard"]),
          "histogram": score_histogram(all_scores)}
