"""Read rewards back from a trajectory stream (or any dir of shards) for evals and plots.

Every worker shard holds graded Trajectory records; infra errors (reward None) are counted apart
and never averaged in as 0 (DESIGN section 4).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from klong_jax.data.shards import iter_trajectories  # noqa: F401 - re-exported (callers)


@dataclasses.dataclass
class RewardStats:
  """Rewards of a set of trajectories, by task and by sampling policy version."""

  rewards: list[float]
  by_task: dict[str, list[float]]
  by_version: dict[int, list[float]]
  infra_errors: int
  statuses: dict[str, int]
  tokens: int

  @property
  def mean(self) -> float:
    return sum(self.rewards) / len(self.rewards) if self.rewards else float("nan")


def read_rewards(directory: str) -> RewardStats:
  """Scans every shard under `directory` (temp files excluded by list_shards)."""
  rewards: list[float] = []
  by_task: dict[str, list[float]] = collections.defaultdict(list)
  by_version: dict[int, list[float]] = collections.defaultdict(list)
  statuses: collections.Counter = collections.Counter()
  infra = tokens = 0
  for t in iter_trajectories(directory):
    statuses[t.status] += 1
    tokens += int(t.loss_mask.sum())
    if t.reward is None:
      infra += 1
      continue
    rewards.append(float(t.reward))
    by_task[t.task_id].append(float(t.reward))
    sampled = t.policy_version[t.policy_version >= 0]
    by_version[int(sampled.min()) if sampled.size else -1].append(float(t.reward))
  return RewardStats(rewards, dict(by_task), dict(by_version), infra, dict(statuses), tokens)


def chunk_stats(directory: str, context: Any) -> dict[str, Any]:
  """Chunks per trajectory under the run's context policy (`context.max_len/overlap/...`)."""
  from klong_jax.data.splitting import SplitConfig, split_trajectory  # noqa: PLC0415
  cfg = SplitConfig(int(context.max_len), int(context.overlap), int(context.completion_tokens))
  counts, tokens, turns = [], [], []
  for t in iter_trajectories(directory):
    counts.append(len(split_trajectory(t, cfg)))
    tokens.append(len(t))
    turns.append(sum(1 for m in t.messages if m.get("role") == "assistant"))
  if not counts:
    return {"trajectories": 0}
  return {"trajectories": len(counts), "chunks_hist": dict(sorted(collections.Counter(counts)
                                                                  .items())),
          "chunks_mean": sum(counts) / len(counts), "chunks_min": min(counts),
          "chunks_max": max(counts), "tokens_mean": sum(tokens) / len(tokens),
          "turns_mean": sum(turns) / len(turns)}


def format_chunk_stats(s: dict[str, Any]) -> str:
  if not s.get("trajectories"):
    return "no trajectories"
  hist = ", ".join(f"{k}: {v}" for k, v in s["chunks_hist"].items())
  return (f"{s['chunks_mean']:.1f} chunks/trajectory (min {s['chunks_min']}, max "
          f"{s['chunks_max']}; histogram {{{hist}}}), {s['turns_mean']:.1f} assistant turns, "
          f"{s['tokens_mean']:.0f} tokens")


def endings_by_stage(directory: str) -> dict[int, dict[str, Any]]:
  """Per RL stage: rollouts by status and the share ended by the stage's time limit."""
  out: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for t in iter_trajectories(directory):
    out[int(t.stage)][t.status] += 1
  res = {}
  for stage, c in sorted(out.items()):
    n = sum(c.values())
    res[stage] = {"n": n, **dict(c), "time_limit_share": c["agent_timeout"] / n if n else 0.0}
  return res


def format_endings(e: dict[int, dict[str, Any]]) -> str:
  return "; ".join(f"stage {s}: {v['time_limit_share']:.0%} of {v['n']} ended by the time limit"
                   for s, v in e.items()) or "no rollouts"
