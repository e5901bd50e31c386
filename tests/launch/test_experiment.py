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


def test_eval_experiment_claims_one_episode_at_a_time():
  """Eval workers run `episodes_per_task` rounds of one episode (a claim each: no idle tail,
  and episode k of task t has the same id in every eval); `eval.workers` sets their number."""
  from configs import demo  # noqa: PLC0415
  c = demo.get_config("")
  exp = experiment.eval_experiment(c, "/tmp/unused-eval", policy_dir="/p", tokenizer="/t.model",
                                   tasks="/tasks", port=1234, episodes_per_task=10)
  workers = [j for j in exp.jobs if j.executable.module == "klong_jax.rollout.worker"]
  assert len(workers) == c.workers.num
  assert {(j.executable.args["group_size"], j.executable.args["rounds"]) for j in workers} == {
      (1, 10)}
  c.eval.workers = 5
  exp = experiment.eval_experiment(c, "/tmp/unused-eval", policy_dir="/p", tokenizer="/t.model",
                                   tasks="/tasks", port=1234)
  workers = [j for j in exp.jobs if j.executable.module == "klong_jax.rollout.worker"]
  assert len(workers) == 5 and workers[0].executable.args["rounds"] == c.eval.episodes_per_task
