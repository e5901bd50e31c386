"""Read rewards back from a trajectory stream (or any dir of shards) for evals and plots.

Every worker shard holds graded Trajectory records; infra errors (reward None) are counted apart
and never averaged in as 0 (DESIGN section 4).
"""

from __future__ import annotations

import collections
import dataclasses

from klong_jax.data import schema, shards


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
  for path in shards.list_shards(directory):
    for raw in shards.read_shard(path):
      t = schema.from_bytes(raw)
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
