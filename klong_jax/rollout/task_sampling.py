"""The order rollout workers visit tasks in: seeded, and interleaving task families.

In directory order a run whose budget is shorter than a pass over the tasks only ever sees the
first families (issue #31: a demo RL run trained on 5 of 10 families, one family per step).
`task_order` deals the tasks round-robin over their families (one task of each family, then the
next of each, ...), each family's tasks and the family order shuffled by (seed, round), so any
window of F consecutive groups covers F distinct families and every stage sees them all as soon
as it has as many groups as there are families. Every worker computes the same order (the ledger
hands each group to one of them). A task's family is its config.yaml `family` (the bundled suites
set it); a task without one is its own family.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def task_family(task: Any) -> str:
  """The family of a loaded task: config.yaml `family`, else the task id (its own family)."""
  fam = (getattr(task, "config", None) or {}).get("family")
  return str(fam) if fam else str(task.id)


def round_order(tasks: Sequence[T], seed: int, rnd: int) -> list[T]:
  """The plain order of round `rnd`: as given for seed < 0, else shuffled by (seed, rnd)."""
  out = list(tasks)
  if seed >= 0:
    random.Random(f"{seed}:{rnd}").shuffle(out)
  return out


def interleaved_order(tasks: Sequence[T], seed: int, rnd: int,
                      family_of: Callable[[T], str] = task_family) -> list[T]:
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
    rng = random.Random(f"interleave:{seed}:{rnd}")
    for name in sorted(by_family):  # sorted: the draws do not depend on the listing order
      rng.shuffle(by_family[name])
    families.sort()
    rng.shuffle(families)
  out: list[T] = []
  for k in range(max((len(v) for v in by_family.values()), default=0)):
    out.extend(by_family[f][k] for f in families if k < len(by_family[f]))
  return out


def task_order(tasks: Sequence[T], seed: int, rnd: int, *, interleave: bool) -> list[T]:
  """The tasks (with `id` and `config`) of round `rnd` in visiting order: `interleaved_order` or
  `round_order`."""
  if interleave:
    return interleaved_order(tasks, seed, rnd)
  return round_order(tasks, seed, rnd)

