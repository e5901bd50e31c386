"""Group-relative advantages (KLong / GRPO style, no critic), framework-free (numpy only).

Rollouts of one task form a group; advantage = reward - mean(group rewards), optionally divided by
the group's std. `infra_error` rollouts (reward None) are left out of the mean and masked out of the
loss (never treated as reward 0). Every chunk of a split rollout carries its rollout's advantage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np


@dataclasses.dataclass
class AdvantageStats:
  """Counts for metrics: groups seen, groups with no signal, and masked infra-error rollouts."""

  num_rollouts: int = 0
  num_groups: int = 0
  num_zero_groups: int = 0   # all valid rewards equal (incl. a single valid rollout): advantage 0
  num_empty_groups: int = 0  # every rollout of the group was an infra error
  num_masked: int = 0        # rollouts with reward None

  def as_metrics(self, prefix: str = "adv/") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


def group_advantages(
    rewards: Sequence[float | None],
    group_ids: Sequence[Hashable],
    *,
    normalize_std: bool = False,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, AdvantageStats]:
  """Returns (advantages float32 [N], valid bool [N], stats) for rollouts in any order.

  `valid[i]` is False for infra errors (reward None); their advantage is 0 and the trainer must
  mask their tokens. A group whose valid rewards are all equal gets exactly 0 (no float residue)
  and is counted in `num_zero_groups`. With `normalize_std`, advantages are divided by
  (population std + eps) of the group's valid rewards (the paper does not divide; default off).
  """
  if len(rewards) != len(group_ids):
    raise ValueError(f"rewards ({len(rewards)}) and group_ids ({len(group_ids)}) differ in length")
  n = len(rewards)
  adv = np.zeros((n,), np.float32)
  valid = np.array([r is not None for r in rewards], bool)
  for i, r in enumerate(rewards):
    if r is not None and not np.isfinite(r):
      raise ValueError(f"rollout {i} (group {group_ids[i]!r}) has non-finite reward {r!r}; "
                       "infra failures must use reward None")
  stats = AdvantageStats(num_rollouts=n, num_masked=int((~valid).sum()))
  groups: dict[Hashable, list[int]] = {}
  for i, g in enumerate(group_ids):
    groups.setdefault(g, []).append(i)
  stats.num_groups = len(groups)
  for members in groups.values():
    idx = [i for i in members if valid[i]]
    if not idx:
      stats.num_empty_groups += 1
      continue
    r = np.array([rewards[i] for i in idx], np.float64)
    if np.all(r == r[0]):
      stats.num_zero_groups += 1
      continue
    a = r - r.mean()
    if normalize_std:
      a = a / (r.std() + eps)
    adv[idx] = a.astype(np.float32)
  return adv, valid, stats


def token_advantages(advantage: float, valid: bool, loss_mask: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Broadcasts a rollout's advantage onto its tokens; invalid rollouts get an all-zero mask.

  Returns (advantages float32 [T], loss_mask int32 [T]); used before splitting so every chunk of
  the rollout carries the same advantage.
  """
  mask = np.asarray(loss_mask, np.int32) * int(valid)
  return np.full(mask.shape, advantage if valid else 0.0, np.float32) * (mask > 0), mask
