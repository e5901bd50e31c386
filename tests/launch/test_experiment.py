"""Task linking for runs: one split per dir, re-linking with another split drops the old links."""

import os

from klong_jax.launch import experiment
from klong_jax.tasks import bundled_tasks_dir, list_tasks


def test_link_tasks_replaces_an_earlier_split(tmp_path):
  root, out = bundled_tasks_dir(), str(tmp_path / "rl")
  experiment.link_tasks(root, "rl", out)
  assert sorted(os.listdir(out)) == sorted(os.path.basename(d) for d in list_tasks(root, "rl"))
  open(os.path.join(out, "notes.txt"), "w").close()  # not a link: left alone
  experiment.link_tasks(root, "train", out, limit=3)
  train = [os.path.basename(d) for d in list_tasks(root, "train")[:3]]
  assert sorted(os.listdir(out)) == sorted(train + ["notes.txt"])
  assert all(os.readlink(os.path.join(out, n)) == os.path.join(root, n) for n in train)


def test_round_order_shuffles_per_round_and_agrees_across_workers():
  from klong_jax.rollout.worker import round_order  # noqa: PLC0415
  tasks = [f"t{i}" for i in range(20)]
  assert round_order(tasks, -1, 3) == tasks
  r0, r1 = round_order(tasks, 0, 0), round_order(tasks, 0, 1)
  assert sorted(r0) == sorted(tasks) and r0 != tasks and r0 != r1
  assert round_order(tasks, 0, 0) == r0  # every worker computes the same order
  assert round_order(tasks, 1, 0) != r0
