"""RL trainer on a pre-filled stream: publishing, curriculum, reference reset, crash + resume."""

import json
import os

import numpy as np
import pytest

from configs import rl_tiny
from klong_jax.inference import reload
from klong_jax.rl import train as rl_train
from klong_jax.rollout.stream import read_control
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


@pytest.mark.slow
def test_publish_curriculum_crash_and_resume(tmp_path):
  stream, work = str(tmp_path / "stream"), str(tmp_path / "run")
  for i in range(4):
    write_group(stream, 0, f"a{i}", [1.0, 0.0, 0.5], version=0, seed=10 * i)
    write_group(stream, 1, f"b{i}", [0.0, 1.0, 1.0], version=0, seed=10 * i + 5)
  assert read_control(stream).stage == 0
  with pytest.raises(RuntimeError, match="simulated crash after step 3"):
    rl_train.run(_config(crash_after=3), work, stream)
  assert reload.list_versions(os.path.join(work, "policy")) == [0, 1]  # v0 + after step 2
  first = [json.loads(x) for x in open(os.path.join(work, "consumed.jsonl"))]
  out = rl_train.run(_config(), work, stream)  # restart: resumes from the step-2 checkpoint
  assert out["start"] == 2 and out["step"] == 6 and out["stage"] == 1
  # Versions: restored params re-published as 2, then after steps 4 and 6.
  assert reload.list_versions(os.path.join(work, "policy")) == [0, 1, 2, 3, 4]
  # The newest version is the final policy, router selection bias included (the bias moves during
  # RL too: a params-only version would route tokens differently on the servers).
  import jax
  final = rl_train.policy_tree(out["state"].params, out["state"].rest)
  got = reload.load_policy(os.path.join(work, "policy", "4"), final)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(final), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(out["state"].rest))
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
  # Stage change after step 4: the reference becomes the current params, so the KL of step 5's
  # first update is 0 (rl_tiny makes rl.updates_per_step = 2 updates per step; the second moved).
  assert m[4]["kl"] > 1e-7 and abs(m[5]["ppo/kl_first"]) < 1e-7 and m[5]["ppo/updates"] == 2
  assert m[6]["stage"] == 1 and "reward/stage_1" in m[6] and "reward/stage_0" in m[1]
  assert m[6]["stream/trajectories_used"] == 18 and 0 < m[6]["utilisation"] <= 1
  assert all(np.isfinite(m[s]["loss"]) for s in m)


@pytest.mark.slow
def test_timed_out_rollouts_train_split_into_chunks(tmp_path):
  """Rollouts a stage time limit cut (long, many chunks each) go through the real trainer:
  every one is trained on (counted as time-limited), over several chunks, with finite loss."""
  stream, work = str(tmp_path / "stream"), str(tmp_path / "run")
  for i in range(2):
    write_group(stream, 0, f"cut{i}", [0.25, 0.75, 0.5], version=0, n=400, seed=10 * i,
                statuses=["agent_timeout", "agent_timeout", "completed"])
  c = _config()
  c.train.steps = 2
  out = rl_train.run(c, work, stream)
  assert out["step"] == 2
  counters = out["counters"]
  assert counters["trajectories_used"] == 6 and counters["time_limited"] == 4
  assert counters["chunks"] >= 3 * 6  # 400-token rollouts, 128-token rows: >= 3 chunks each
  m = _metrics(work)
  assert all(np.isfinite(m[s]["loss"]) for s in m) and m[2]["stream/time_limited"] == 4


@pytest.mark.slow
def test_init_from_sft_checkpoint_and_policy_dir(tmp_path):
  import jax

  from klong_jax.model import sharded
  from klong_jax.model.config import from_config_dict
  from klong_jax.parallel import mesh as mesh_lib
  from klong_jax.parallel import rules as rules_lib
  from klong_jax.train import checkpoint, optim
  from klong_jax.train import step as step_lib
  c = _config()
  mesh = mesh_lib.make_mesh(c.mesh)
  def params(seed):
    m = sharded.create_sharded_model(from_config_dict(c.model), mesh, seed=seed)
    return step_lib.split_model(m)
  _, p1, r1 = params(1)
  # SFT moved the router's selection bias (outside the gradient): it is part of the policy.
  r1 = jax.tree.map(lambda x: x + 0.25 if np.issubdtype(x.dtype, np.floating) else x, r1)
  assert jax.tree.leaves(r1), "the tiny model must carry router bias state"
  tx = optim.make_optimizer(c.optim)
  state = step_lib.init_state(p1, r1, tx, step_lib.state_shardings(p1, r1, tx, mesh,
                                                                   rules_lib.LOGICAL_RULES))
  with checkpoint.Checkpointer(str(tmp_path / "sft" / "checkpoints"), async_save=False) as ck:
    ck.save(7, state, force=True)
  reload.save_policy(tmp_path / "pol", 3, rl_train.policy_tree(p1, r1))
  reload.save_policy(tmp_path / "params_only", 0, p1)
  _, p0, r0 = params(0)
  def same(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for src in (tmp_path / "sft", tmp_path / "pol", tmp_path / "pol" / "3"):
    got_p, got_r = rl_train.load_init_params(str(src), p0, r0)
    same(got_p, p1)
    same(got_r, r1)
  got_p, got_r = rl_train.load_init_params(str(tmp_path / "params_only"), p0, r0)
  same(got_p, p1)
  same(got_r, r0)  # A params-only policy keeps the given router state.
  with pytest.raises(FileNotFoundError, match="no SFT checkpoint"):
    rl_train.load_init_params(str(tmp_path), p0, r0)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", pytest.param("gcs", marks=pytest.mark.gcs)])
@pytest.mark.subprocess
def test_sigkilled_trainer_process_resumes_exactly_once(tmp_path, where, request):
  """The trainer as a separate process, SIGKILLed mid-run (no cleanup, maybe mid-save), then
  restarted on the same workdir: every trajectory is trained in exactly one step. With `gcs` the
  workdir (Orbax checkpoints, policy versions) and the stream are gs:// on the GCS emulator."""
  import signal
  import subprocess
  import sys
  import time

  if where == "gcs":
    root = request.getfixturevalue("gcs_root")  # (sets the emulator env the trainer inherits)
    stream, work = f"{root}/stream", f"{root}/run"
  else:
    stream, work = str(tmp_path / "stream"), str(tmp_path / "run")
  logdir = str(tmp_path / "logs")
  for i in range(4):
    write_group(stream, 0, f"a{i}", [1.0, 0.0, 0.5], version=0, seed=10 * i)
    write_group(stream, 1, f"b{i}", [0.0, 1.0, 1.0], version=0, seed=10 * i + 5)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  argv = [sys.executable, "-m", "klong_jax.rl.train",
          "--config=configs/rl_tiny.py:runlocal,steps=6,stage_steps=4,batch=8,row_len=128,"
          "staleness=100", "--config.optim.lr=0.01", f"--workdir={work}", f"--stream={stream}",
          f"--logdir={logdir}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  log = os.path.join(logdir, "consumed.jsonl")
  err = tmp_path / "trainer.log"  # a file, not a pipe: a full pipe would stall the trainer
  with open(err, "w") as f:
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=f)
  try:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
      if os.path.exists(log) and sum(1 for _ in open(log)) >= 3:
        break
      time.sleep(0.05)
    assert proc.poll() is None, err.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  first = [json.loads(x) for x in open(log) if x.strip()]
  assert 3 <= max(r["step"] for r in first) < 6

  res = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  per_step = {}
  for r in (json.loads(x) for x in open(log) if x.strip()):
    per_step[r["step"]] = r["ids"]  # a step replayed after the kill replaces the killed one
  for r in first:  # a replayed step consumed exactly what the killed process consumed
    assert per_step[r["step"]] == r["ids"]
  ids = [i for s in sorted(per_step) for i in per_step[s]]
  print(f"\n{where} trainer SIGKILLed after step {max(r['step'] for r in first)}: "
        f"{len(ids)} trajectories trained over both runs (expected 18), duplicates "
        f"{len(ids) - len(set(ids))}")
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6] and len(ids) == len(set(ids)) == 18


@pytest.mark.slow
def test_ppo_epochs_and_minibatches_resume_equals_uninterrupted(tmp_path):
  """2 epochs x minibatches of 4 rows: several optimizer updates per element, the LR schedule
  stretched to match, and a crash + resume replays the same shuffles (== an uninterrupted run)."""
  import shutil

  import jax

  def config(**train):
    c = _config(**train)
    c.mesh.update(data=4, tensor=2)  # 4-way data parallel: 8-row batch -> 4-row minibatches.
    c.rl.update(ppo_epochs=2, minibatches=2)
    return c

  def fill(stream):
    for i in range(4):
      write_group(stream, 0, f"a{i}", [1.0, 0.0, 0.5, 0.2, 0.9, 0.0], version=0, seed=10 * i)
      write_group(stream, 1, f"b{i}", [0.0, 1.0, 1.0, 0.3, 0.1, 0.6], version=0,
                  seed=10 * i + 5)

  fill(str(tmp_path / "s1"))
  shutil.copytree(tmp_path / "s1", tmp_path / "s2")
  whole = rl_train.run(config(), str(tmp_path / "w1"), str(tmp_path / "s1"))
  m = _metrics(str(tmp_path / "w1"))
  updates = [int(m[s]["ppo/updates"]) for s in sorted(m)]
  # 6 one-chunk rollouts per element: 2 minibatches (3 + 3 loss rows) x 2 epochs.
  assert whole["step"] == 6 and updates == [4] * 6
  assert int(whole["state"].step) == sum(updates)  # state.step counts optimizer updates
  assert m[1]["ppo/ratio_mean_first"] != m[1]["ppo/ratio_mean_last"]  # later epochs moved it
  # The schedule counts updates, stretched by epochs x minibatches (4): warmup 2 elements = 8
  # updates, so step 1's logged lr is the lr after its 4th update.
  assert m[1]["lr"] == pytest.approx(config().optim.lr * 3 / 8, rel=1e-6)

  with pytest.raises(RuntimeError, match="simulated crash after step 3"):
    rl_train.run(config(crash_after=3), str(tmp_path / "w2"), str(tmp_path / "s2"))
  resumed = rl_train.run(config(), str(tmp_path / "w2"), str(tmp_path / "s2"))
  assert resumed["start"] == 2 and int(resumed["state"].step) == sum(updates)
  for a, b in zip(jax.tree.leaves(whole["state"].params), jax.tree.leaves(
      resumed["state"].params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_minibatches_must_divide_the_data_parallel_batch(tmp_path):
  c = _config()
  c.rl.minibatches = 3
  with pytest.raises(ValueError, match="rl.minibatches"):
    rl_train.run(c, str(tmp_path / "w"), str(tmp_path / "s"))


@pytest.mark.gcs
def test_gcs_run_crash_and_resume_exactly_once(gcs_root, tmp_path):
  """Workdir and stream on gs:// (the GCS emulator; no gcsfuse): policy versions, Orbax
  checkpoints and control.json go to GCS; a crash after step 3 resumes from the gs:// step-2
  checkpoint and, over both runs, every one of the 18 trajectories is trained exactly once."""
  import jax

  from klong_jax.data import storage
  from klong_jax.train import checkpoint
  stream, work, logdir = f"{gcs_root}/stream", f"{gcs_root}/run", str(tmp_path / "logs")
  for i in range(4):
    write_group(stream, 0, f"a{i}", [1.0, 0.0, 0.5], version=0, seed=10 * i)
    write_group(stream, 1, f"b{i}", [0.0, 1.0, 1.0], version=0, seed=10 * i + 5)
  with pytest.raises(RuntimeError, match="simulated crash after step 3"):
    rl_train.run(_config(crash_after=3), work, stream, logdir=logdir)
  assert reload.list_versions(f"{work}/policy") == [0, 1]
  with checkpoint.Checkpointer(f"{work}/checkpoints") as ck:
    assert ck.all_steps() == [2]
  first = [json.loads(x) for x in open(os.path.join(logdir, "consumed.jsonl"))]
  out = rl_train.run(_config(), work, stream, logdir=logdir)
  assert out["start"] == 2 and out["step"] == 6 and out["stage"] == 1
  assert reload.list_versions(f"{work}/policy") == [0, 1, 2, 3, 4]
  final = rl_train.policy_tree(out["state"].params, out["state"].rest)
  got = reload.load_policy(f"{work}/policy/4", final)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(final), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert read_control(stream).stage == 1
  log = [json.loads(x) for x in open(os.path.join(logdir, "consumed.jsonl"))]
  assert storage.read(f"{work}/logs/consumed.jsonl")[0].decode().splitlines() == \
      [json.dumps(r) for r in log]  # mirrored to the bucket
  per_step = {}
  for r in log:
    per_step[r["step"]] = r["ids"]  # the replayed step 3 replaces the crashed run's
  assert [r["ids"] for r in first if r["step"] == 3] == [per_step[3]]
  ids = [i for s in sorted(per_step) for i in per_step[s]]
  print(f"\ngs:// trainer: crash after step 3, resumed at step {out['start']} -> "
        f"{out['step']}; {len(ids)} trajectories trained (expected 18), "
        f"duplicates {len(ids) - len(set(ids))}")
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6] and len(ids) == len(set(ids)) == 18


@pytest.mark.slow
def test_decoupled_off_policy_trainer_on_a_sharded_mesh(tmp_path):
  """rl.off_policy='decoupled': the proximal log-probs are recomputed before each element's
  updates (so the first update's ratio pi/pi_prox is exactly 1 although the fake behaviour
  logprobs are far off), the importance weights stay under is_cap, and staleness is logged."""
  c = _config()
  c.mesh.update(data=4, tensor=2)
  c.rl.update(ppo_epochs=2, minibatches=2, off_policy="decoupled", is_cap=2.0, publish_every=1)
  for i in range(3):
    write_group(str(tmp_path / "s"), 0, f"a{i}", [1.0, 0.0, 0.5, 0.2, 0.9, 0.0], version=0,
                seed=10 * i)
  c.train.steps = 3
  out = rl_train.run(c, str(tmp_path / "w"), str(tmp_path / "s"))
  m = _metrics(str(tmp_path / "w"))
  assert out["step"] == 3 and out["counters"]["dropped_stale"] == 0
  for s in sorted(m):
    assert m[s]["ppo/ratio_mean_first"] == pytest.approx(1.0, abs=1e-5)
    assert m[s]["ppo/ratio_mean_last"] != pytest.approx(1.0, abs=1e-5)  # later updates moved
    # The fakes' behaviour logprobs (-0.1..-3) far exceed a random policy's (~log 1/512): every
    # weight pi_prox/mu is small, none truncated.
    assert 0 < m[s]["is/raw_min"] <= m[s]["is/weight_mean"] <= m[s]["is/weight_max"] < 1.0
    assert m[s]["is/weight_max"] == m[s]["is/raw_max"] and m[s]["is/truncated_frac"] == 0.0
  assert [m[s]["stale/max"] for s in sorted(m)] == [0.0, 1.0, 2.0]  # version 0 data, trainer 0..2


@pytest.mark.slow
def test_element_with_every_turn_masked_makes_no_update_and_training_goes_on(tmp_path):
  """rl.length_cut="mask" on a group whose every policy turn hit max_tokens leaves no loss tokens:
  that step makes no optimizer update (params unchanged, counted once), the next step trains."""
  from klong_jax.data import shards
  from tests.rl.fakes import make_trajectory
  stream, work = str(tmp_path / "stream"), str(tmp_path / "run")
  trajs = [make_trajectory(f"tcut-s0-{i}", "tcut-s0", r, 0, seed=i) for i, r in
           enumerate([1.0, 0.0, 0.5])]
  for t in trajs:  # policy turns are 10 tokens every 20 from the 20-token prefix
    t.cut_turns = [[s, s + 10] for s in range(20, len(t.tokens), 20)]
  path = os.path.join(stream, "0", "cut.array_record")
  shards.write_shard(path, [t.to_bytes() for t in trajs])
  os.utime(path, ns=(1, 1))  # published before the next group
  write_group(stream, 0, "ok", [1.0, 0.0, 0.5], version=0, seed=7)
  c = _config()
  c.train.steps = 2
  c.rl.length_cut = "mask"
  out = rl_train.run(c, work, stream)
  assert out["step"] == 2 and out["counters"]["trajectories_used"] == 6
  assert out["counters"]["cut_turns_masked"] == 3 * 4
  rows = {r["step"]: r for r in map(json.loads, open(os.path.join(work, "metrics.jsonl")))
          if "ppo/updates" in r}
  assert rows[1]["ppo/updates"] == 0 and rows[1]["loss_tokens"] == 0 and "loss" not in rows[1]
  assert rows[2]["ppo/updates"] == 2 and np.isfinite(rows[2]["loss"])
  consumed = [json.loads(x) for x in open(os.path.join(work, "consumed.jsonl"))]
  assert [len(r["ids"]) for r in consumed] == [3, 3]
