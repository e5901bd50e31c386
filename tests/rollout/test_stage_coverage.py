"""Every task family in every RL stage (issue #31): the demo's RL claim sequence, simulated
through the real worker loop (`Worker.run`), covers all families in each stage's groups."""

import os

import pytest

from configs import demo as demo_config
from klong_jax import config_util
from klong_jax.demo import ablation
from klong_jax.rollout import task_sampling as ts
from klong_jax.rollout import worker as worker_lib
from klong_jax.rollout.stream import Control
from klong_jax.tasks import bundled_tasks_dir, list_tasks


class _Done(Exception):
  pass


class _Fleet:
  """The trainer and the ledger, as the worker loop sees them: claims are recorded per stage;
  the trainer moves to stage s + 1 once stage s's groups (groups x stage steps) were claimed
  and `overshoot` more (async workers claim on at the old stage until they read control.json)."""

  def __init__(self, per_stage: list[int], overshoot: int):
    self.per_stage, self.overshoot = per_stage, overshoot
    self.stage = 0
    self.claims: dict[int, list[str]] = {}

  def control(self) -> Control:
    return Control(stage=self.stage, time_limit_s=15.0)

  def claim(self, group_id: str, stage: int) -> str:
    got = self.claims.setdefault(stage, [])
    got.append(group_id)
    last = len(self.per_stage) - 1
    if stage == last and len(got) >= self.per_stage[last]:
      raise _Done
    if stage < last and len(got) >= self.per_stage[stage] + self.overshoot:
      self.stage += 1
    return f"{stage}/{group_id}.array_record"

  def published(self, shard: str) -> bool:
    del shard
    return False

  def publish(self, *args) -> None:
    del args


def _rl_plan(c) -> tuple[list[int], int]:
  """(groups claimed per stage, the trainer's groups per step) of a demo config's RL."""
  rl = config_util.load_config(c.rl.config, config_util.format_arg(c.rl.args))
  groups = int(rl.rl.groups_per_step)
  return [n * groups for n in ablation.stage_steps(c)], groups


def _claims(c, task_dirs: list[str], overshoot: int, tmp_path) -> dict[int, list[str]]:
  """The groups the demo's workers claim per stage, through `Worker.run` (no server, sandbox
  or tokenizer: the loop's task order, stage handling and claims are the real code)."""
  per_stage, _ = _rl_plan(c)
  fleet = _Fleet(per_stage, overshoot)
  w = worker_lib.Worker.__new__(worker_lib.Worker)
  w.cfg = worker_lib.WorkerConfig.from_fields(
      server="", tasks="", stream=str(tmp_path), tokenizer="", group_size=c.workers.group_size,
      rounds=c.workers.rounds, shuffle_seed=c.workers.shuffle_seed, backend="local")
  w.name, w.judge, w.stream = "w0", None, fleet
  w.wait_for_policy = fleet.control
  w.run_group = lambda task, group_id, ctl, limit: []
  with pytest.raises(_Done):
    w.run(task_dirs)
  return fleet.claims


def _family(group_id: str, families: dict[str, str]) -> str:
  return families[group_id.rsplit("-s", 1)[0]]


@pytest.mark.parametrize("arm", ["rl_prog", "rl_fixed"])
@pytest.mark.parametrize("overshoot", [0, 1, 3, 4, 7])
def test_every_stage_of_the_demo_rl_covers_every_family(arm, overshoot, tmp_path):
  c = ablation.arm_config(demo_config.get_config(""), arm, 0)
  assert c.tasks.suite == "long" and c.tasks.rl_split == "rl" and not c.tasks.max_rl
  root = os.path.join(os.path.dirname(bundled_tasks_dir()), "data_long")
  dirs = list_tasks(root, "rl")
  from klong_jax.tasks import load_task
  families = {t.id: ts.task_family(t) for t in map(load_task, dirs)}
  every = set(families.values())
  assert len(every) == 10
  per_stage, _ = _rl_plan(c)
  # The config must give each stage at least one group per family...
  assert min(per_stage) >= len(every), (arm, per_stage)
  claims = _claims(c, dirs, overshoot, tmp_path)
  assert sorted(claims) == list(range(len(per_stage)))
  for stage, n in enumerate(per_stage):
    # ... and the groups the trainer takes first in each stage (its first n claims) must hold
    # every family, however many groups the previous stage's workers overshot by.
    got = {_family(g, families) for g in claims[stage][:n]}
    assert got == every, (arm, stage, overshoot, sorted(every - got))


def test_a_stage_walk_restarts_and_does_not_depend_on_the_previous_stage(tmp_path):
  # Stage 1's claims are the same whether stage 0 overshot by 0 or by 7 groups (reproducible
  # under load), and differ from stage 0's order (each stage has its own shuffle).
  c = demo_config.get_config("")
  dirs = list_tasks(os.path.join(os.path.dirname(bundled_tasks_dir()), "data_long"), "rl")
  a = _claims(c, dirs, 0, tmp_path / "a")
  b = _claims(c, dirs, 7, tmp_path / "b")
  n = _rl_plan(c)[0][1]
  assert len(b[1]) == n + 7 and a[1] == b[1][:n] and a[2] == b[2]
  strip = lambda ids: [g.rsplit("-s", 1)[0] for g in ids]  # noqa: E731
  assert strip(a[0][:10]) != strip(a[1][:10])


def test_stage_cycle_stage_zero_is_the_earlier_order_and_rounds_end():
  # Stage 0 (every eval) keeps today's order, so eval episode keys stay the same.
  mk = lambda tid, fam: type("T", (), {"id": tid, "config": {"family": fam}})()  # noqa: E731
  tasks = [mk(f"{f}{i}", f) for f in "abc" for i in range(2)]
  cyc = ts.StageCycle(tasks, 0, 2, interleave=True)
  walk = [cyc.next(0) for _ in range(12)]
  assert [t for r, t in walk if r == 0] == ts.task_order(tasks, 0, 0, interleave=True)
  assert [t for r, t in walk if r == 1] == ts.task_order(tasks, 0, 1, interleave=True)
  assert cyc.next(0) is None  # 2 rounds used up
  first = cyc.next(1)  # a new stage starts its own walk at round 0
  assert first == (0, ts.task_order(tasks, 0, 0, interleave=True, stage=1)[0])
