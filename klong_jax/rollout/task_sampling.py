"""The order rollout workers visit tasks in: seeded, and interleaving task families.

In directory order a run whose budget is shorter than a pass over the tasks only ever sees the
first families (issue #31: a demo RL run trained on 5 of 10 families, one family per step).
`task_order` deals the tasks round-robin over their families (one task of each family, then the
next of each, ...), each family's tasks and the family order shuffled by (seed, round), so any
window of F consecutive groups covers F distinct families and every stage sees them all as soon
as it has as many groups as there are families. Every worker computes the same order (the ledger
hands each group to one of them). A task's family is its config.yaml `family` (the bundled suites
set it); a task without one is its own family.

Progressive RL changes the stage (control.json) while the workers are part way through a round.
`StageCycle` restarts the order at the first position of a fresh, stage-keyed order whenever the
stage changes, so each stage's claims begin with a whole family cycle: its first F groups cover
the F families, and which tasks a stage gets does not depend on how many groups the previous
stage happened to claim (async workers overshoot a stage by a load-dependent amount). Continuing
the round instead (the earlier behaviour) started stage s + 1 wherever stage s left off, often in
the last cycle of a round, whose window ran into the next round's reshuffled family order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def task_family(task: Any) -> str:
  """The family of a loaded task: config.yaml `family`, else the task id (its own family)."""
  fam = (getattr(task, "config", None) or {}).get("family")
  return str(fam) if fam else str(task.id)


def _round_key(rnd: int, stage: int) -> str:
  """The shuffle key of (round, stage): stage 0 keeps the keys of the earlier, stage-free
  orders (evals and existing streams see the same order), later stages get their own."""
  return f"{rnd}" if stage == 0 else f"{rnd}:stage{stage}"


def round_order(tasks: Sequence[T], seed: int, rnd: int, stage: int = 0) -> list[T]:
  """The plain order of round `rnd`: as given for seed < 0, else shuffled by (seed, stage, rnd)."""
  out = list(tasks)
  if seed >= 0:
    random.Random(f"{seed}:{_round_key(rnd, stage)}").shuffle(out)
  return out


def interleaved_order(tasks: Sequence[T], seed: int, rnd: int,
                      family_of: Callable[[T], str] = task_family, stage: int = 0) -> list[T]:
  """Round-robin over families: position k*F+j holds the k-th task of the j-th family.

  seed >= 0 shuffles each family's tasks and the family order by (seed, rnd) (reproducible, the
  same on every worker); seed < 0 keeps the given order of families (first appearance) and of
  tasks within each. Families with fewer tasks drop out of later cycles. A seeded order does
  not depend on the order `tasks` is listed in (tasks are sorted by id first).
  """
  if seed >= 0:
    tasks = sorted(tasks, key=lambda t: str(t.id))
  by_family: dict[str, list[T]] = {}
  for t in tasks:
    by_family.setdefault(family_of(t), []).append(t)
  families = list(by_family)
  if seed >= 0:
    rng = random.Random(f"interleave:{seed}:{_round_key(rnd, stage)}")
    for name in sorted(by_family):  # sorted: the draws do not depend on the listing order
      rng.shuffle(by_family[name])
    families.sort()
    rng.shuffle(families)
  out: list[T] = []
  for k in range(max((len(v) for v in by_family.values()), default=0)):
    out.extend(by_family[f][k] for f in families if k < len(by_family[f]))
  return out


def task_order(tasks: Sequence[T], seed: int, rnd: int, *, interleave: bool,
               stage: int = 0) -> list[T]:
  """The tasks (with `id` and `config`) of round `rnd` of `stage` in visiting order:
  `interleaved_order` or `round_order`."""
  if interleave:
    return interleaved_order(tasks, seed, rnd, stage=stage)
  return round_order(tasks, seed, rnd, stage)


class StageCycle(Generic[T]):
  """A worker's walk over (round, task) that restarts with a fresh order when the stage changes.

  `next(stage)` returns the next (round, task) of `stage`'s walk: `rounds` passes over the tasks
  in `task_order(..., stage=stage)`; a stage other than the current one starts its walk at round
  0, position 0. None when the stage's rounds are used up. Group ids carry the stage
  (`<task>-s<stage>-r<round>`), so a restarted walk never collides with an earlier stage's.
  """

  def __init__(self, tasks: Sequence[T], seed: int, rounds: int, *, interleave: bool):
    self.tasks, self.seed, self.rounds, self.interleave = list(tasks), seed, rounds, interleave
    self.stage: int | None = None
    self._round = 0
    self._pos = 0
    self._order: list[T] = []

  def next(self, stage: int) -> tuple[int, T] | None:
    """The next (round, task) of `stage` (see the class docstring)."""
    if stage != self.stage:
      self.stage, self._round, self._pos, self._order = stage, 0, 0, []
    while True:
      if self._round >= self.rounds or not self.tasks:
        return None
      if not self._order:
        self._order = task_order(self.tasks, self.seed, self._round,
                                 interleave=self.interleave, stage=stage)
      if self._pos < len(self._order):
        self._pos += 1
        return self._round, self._order[self._pos - 1]
      self._round, self._pos, self._order = self._round + 1, 0, []

