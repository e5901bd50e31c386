"""Progressive RL curriculum (KLong): stages with growing rollout time limits, framework-free.

A stage has a rollout time limit (paper: 2 h -> 4 h -> 6 h; the demo: seconds, on the clock
`budget_clock` names, sent to the workers with it: agent/budget.py), an end rule (a
step count, and/or a promotion rule: mean reward over the last `window` elements >= a threshold
after `min_steps`) and a task mix (task-id globs sent to the fleet). The trainer asks `observe()`
after every step; when it says the stage is over, the trainer calls `advance()`, resets the
reference policy and writes the new control file (`control()`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage; `steps == 0` with no `promote_reward` means: until training ends."""

  time_limit_s: float
  steps: int = 0
  promote_reward: float | None = None
  min_steps: int = 0
  tasks: tuple[str, ...] = ()

  def __post_init__(self):
    if self.time_limit_s <= 0 or self.steps < 0 or self.min_steps < 0:
      raise ValueError(f"curriculum stage needs time_limit_s > 0, steps >= 0, min_steps >= 0: "
                       f"{self}")


def stages_from_config(items: Sequence[Mapping[str, Any]]) -> list[Stage]:
  """Stages from the config's list of dicts; a clear error names a bad entry."""
  if not items:
    raise ValueError("curriculum.stages is empty; give at least one stage with time_limit_s")
  out = []
  fields = {f.name for f in dataclasses.fields(Stage)}
  for i, item in enumerate(items):
    d = dict(item)
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"curriculum.stages[{i}] has unknown keys {sorted(unknown)}; allowed: "
                       f"{sorted(fields)}")
    pr = d.get("promote_reward")
    d["promote_reward"] = None if pr is None or pr == "" else float(pr)
    tasks = d.get("tasks", ())
    d["tasks"] = tuple(t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t)
    out.append(Stage(**d))
  return out


class Curriculum:
  """Tracks the current stage and decides promotions; its state is JSON for the checkpoint."""

  def __init__(self, stages: Sequence[Stage], window: int = 4, budget_clock: str = ""):
    if window < 1:
      raise ValueError(f"curriculum window must be >= 1, got {window}")
    if budget_clock not in ("", "wall", "tokens"):
      raise ValueError(f"curriculum.budget_clock {budget_clock!r} must be 'wall', 'tokens' or "
                       "'' (the workers' own)")
    self.budget_clock = budget_clock
    self.stages = list(stages)
    self.window = window
    self.index = 0
    self.start_step = 0
    self._rewards: collections.deque[float] = collections.deque(maxlen=window)

  @property
  def stage(self) -> Stage:
    return self.stages[self.index]

  @property
  def is_last(self) -> bool:
    return self.index == len(self.stages) - 1

  def observe(self, step: int, reward_mean: float | None) -> bool:
    """Records an element's mean reward (None: no new element); True if the stage should end."""
    if reward_mean is not None:
      self._rewards.append(float(reward_mean))
    if self.is_last:
      return False
    st, done = self.stage, step - self.start_step
    if st.steps and done >= st.steps:
      return True
    if (st.promote_reward is not None and done >= st.min_steps
        and len(self._rewards) == self.window
        and sum(self._rewards) / self.window >= st.promote_reward):
      return True
    return False

  def advance(self, step: int) -> Stage:
    """Moves to the next stage at `step`; returns it."""
    if self.is_last:
      raise ValueError("curriculum is already at its last stage")
    self.index += 1
    self.start_step = step
    self._rewards.clear()
    return self.stage

  def control(self, policy_min_version: int = -1) -> dict[str, Any]:
    """The stream control file for the current stage (rollout/stream.py `Control`)."""
    out: dict[str, Any] = {"stage": self.index, "time_limit_s": self.stage.time_limit_s,
                           "policy_min_version": int(policy_min_version)}
    if self.stage.tasks:
      out["tasks"] = list(self.stage.tasks)
    if self.budget_clock:
      out["budget_clock"] = self.budget_clock
    return out

  def state_dict(self) -> dict[str, Any]:
    return {"index": self.index, "start_step": self.start_step, "rewards": list(self._rewards)}

  def load_state_dict(self, d: Mapping[str, Any]) -> None:
    if not 0 <= int(d["index"]) < len(self.stages):
      raise ValueError(f"checkpointed curriculum stage {d['index']} is out of range for the "
                       f"{len(self.stages)} configured stages")
    self.index = int(d["index"])
    self.start_step = int(d["start_step"])
    self._rewards = collections.deque(d.get("rewards", []), maxlen=self.window)
