"""RL trainer on a pre-filled stream: publishing, curriculum, reference reset, crash + resume."""

import json
import os

import numpy as np
import pytest

from configs import rl_tiny
from klong_jax.inference import reload
from klong_jax.rollout.stream import read_control
from klong_jax.train import rl
from tests.rl.fakes import write_group


def _config(**train):
  c = rl_tiny.get_config("runlocal,steps=6,stage_steps=4,batch=8,row_len=128,staleness=100")
  c.optim.lr = 1e-2
  c.checkpoint.every = 2
  c.train.update(train)
  return c


def _metrics(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  by_step = {}
  for r in rows:
    if "loss" in r:
      by_step[r["step"]] = r  # the resumed run's rows replace the crashed run's
  return by_step


def test_publish_curriculum_crash_and_resume(tmp_path):
  stream, work = str(tmp_path / "stream"), str(tmp_path / "run")
  for i in range(4):
    write_group(stream, 0, f"a{i}", [1.0, 0.0, 0.5], version=0, seed=10 * i)
    write_group(stream, 1, f"b{i}", [0.0, 1.0, 1.0], version=0, seed=10 * i + 5)
  assert read_control(stream).stage == 0
  with pytest.raises(RuntimeError, match="simulated crash after step 3"):
    rl.run(_config(crash_after=3), work, stream)
  assert reload.list_versions(os.path.join(work, "policy")) == [0, 1]  # v0 + after step 2
  first = [json.loads(x) for x in open(os.path.join(work, "consumed.jsonl"))]
  out = rl.run(_config(), work, stream)  # restart: resumes from the step-2 checkpoint
  assert out["start"] == 2 and out["step"] == 6 and out["stage"] == 1
  # Versions: restored params re-published as 2, then after steps 4 and 6.
  assert reload.list_versions(os.path.join(work, "policy")) == [0, 1, 2, 3, 4]
  ctl = read_control(stream)
  assert ctl.stage == 1 and ctl.time_limit_s == 10.0 and ctl.policy_min_version == -1

  # Exactly once: the step replayed after the crash consumed the same trajectories again, and
  # over the final history each trajectory was trained in exactly one step.
  log = [json.loads(x) for x in open(os.path.join(work, "consumed.jsonl"))]
  per_step = {}
  for r in log:
    per_step[r["step"]] = r["ids"]
  assert [r["ids"] for r in first if r["step"] == 3] == [per_step[3]]
  ids = [i for s in sorted(per_step) for i in per_step[s]]
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6] and len(ids) == len(set(ids)) == 18
  assert {i.split("-")[0][1] for i in ids} == {"a", "b"}  # stage 0 drained, then stage 1

  m = _metrics(work)
  # Stage change after step 4: the reference becomes the current params, so step 5's KL is 0.
  assert m[4]["kl"] > 1e-7 and abs(m[5]["kl"]) < 1e-7
  assert m[6]["stage"] == 1 and "reward/stage_1" in m[6] and "reward/stage_0" in m[1]
  assert m[6]["stream/trajectories_used"] == 18 and 0 < m[6]["utilisation"] <= 1
  assert all(np.isfinite(m[s]["loss"]) for s in m)


def test_init_from_sft_checkpoint_and_policy_dir(tmp_path):
  import jax

  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  from klong_jax.parallel import rules as rules_lib
  from klong_jax.train import checkpoint, optim
  from klong_jax.train import step as step_lib
  c = _config()
  mesh = mesh_lib.make_mesh(c.mesh)
  def params(seed):
    m = rules_lib.create_sharded_model(from_config_dict(c.model), mesh, seed=seed)
    return step_lib.split_model(m)
  _, p1, r1 = params(1)
  tx = optim.make_optimizer(c.optim)
  state = step_lib.init_state(p1, r1, tx, step_lib.state_shardings(p1, r1, tx, mesh,
                                                                   rules_lib.LOGICAL_RULES))
  with checkpoint.Checkpointer(str(tmp_path / "sft" / "checkpoints"), async_save=False) as ck:
    ck.save(7, state, force=True)
  reload.save_policy(tmp_path / "pol", 3, p1)
  _, p0, _ = params(0)
  for src in (tmp_path / "sft", tmp_path / "pol", tmp_path / "pol" / "3"):
    got = rl.load_init_params(str(src), p0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p1), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileNotFoundError, match="no SFT checkpoint"):
    rl.load_init_params(str(tmp_path), p0)
