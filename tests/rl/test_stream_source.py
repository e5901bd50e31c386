"""The RL stream source: exactly-once over restart, staleness and stage drops, advantages, waits."""

import json
import os

import numpy as np
import pytest

from klong_jax.data.splitting import SplitConfig
from klong_jax.rl.stream_source import StreamConfig, StreamDataset
from tests.rl.fakes import write_group


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def stream_root(request, tmp_path):
  """The stream dir: local, or a gs:// prefix on the GCS emulator (listed and read natively)."""
  return request.getfixturevalue("gcs_root") if request.param == "gcs" else tmp_path


def _cfg(stream, **kw):
  base = dict(stream=str(stream), batch_size=1, row_len=64, split=SplitConfig(max_len=64,
              overlap=8), groups_per_step=2, max_staleness=1, poll_s=0.01, wait_timeout_s=2.0)
  base.update(kw)
  return StreamConfig(**base)


def _publish(stream, k, stage=0, version=0, start=0):
  for i in range(start, start + k):
    write_group(str(stream), stage, f"w-{i:03d}", [float(i % 3), 1.0, 0.0], version, seed=10 * i)


def _take(it, n):
  out = []
  for _ in range(n):
    b = next(it)
    out.append((b, list(it.last_info["ids"])))
  return out


def test_exactly_once_across_restart(stream_root):
  _publish(stream_root, 6)
  ref_it = iter(StreamDataset(_cfg(stream_root)))
  ref = _take(ref_it, 36)
  assert ref_it.counters["groups"] == 6 and ref[-1][0]["tokens"].any()  # 3 elements x 12 batches
  if ref_it.remote:  # gs://: only the current element's shards stay in the local cache
    cached = sorted(os.path.relpath(os.path.join(d, f), ref_it._cache)
                    for d, _, fs in os.walk(ref_it._cache) for f in fs)
    assert cached == sorted(s["path"] for s in ref_it._element["shards"])
  for cut in (1, 12, 19):  # mid-element and element boundaries
    it = iter(StreamDataset(_cfg(stream_root)))
    first = _take(it, cut)
    state = json.loads(json.dumps(it.get_state()))  # what Grain writes into the checkpoint
    it2 = iter(StreamDataset(_cfg(stream_root)))
    it2.set_state(state)
    rest = _take(it2, 36 - cut)
    for (a, ids_a), (b, ids_b) in zip(ref, first + rest, strict=True):
      assert ids_a == ids_b
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  # Every trajectory id appears in exactly one batch; every loss token trained exactly once.
  ids = [i for _, ids in ref for i in ids]
  assert len(ids) == len(set(ids)) == 18
  trained = sum(int(b["loss_mask"].sum()) for b, _ in ref)
  assert trained == 18 * 40  # 4 policy turns of 10 tokens per 100-token trajectory


def test_follows_new_shards_and_times_out(tmp_path):
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, wait_timeout_s=0.3, batch_size=8)))
  with pytest.raises(TimeoutError, match=str(tmp_path)):
    next(it)
  _publish(tmp_path, 1)
  next(it)
  assert it.last_info["ids"] == ["tw-000-s0-0", "tw-000-s0-1", "tw-000-s0-2"]


def test_staleness_drops_are_counted(tmp_path):
  write_group(str(tmp_path), 0, "old", [1.0, 0.0], version=3, seed=1)
  write_group(str(tmp_path), 0, "new", [1.0, 0.0], version=4, seed=2)
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, batch_size=8)))
  it.set_policy_version(5)
  next(it)
  assert it.counters["dropped_stale"] == 2 and it.counters["trajectories_used"] == 2
  assert it.last_info["min_version"] == 4 and it.last_info["ids"][0].startswith("tnew")


def test_advantages_and_infra_errors(tmp_path):
  write_group(str(tmp_path), 0, "g", [1.0, 0.0, None, 0.5], version=0, seed=3)
  write_group(str(tmp_path), 0, "same", [0.5, 0.5], version=0, seed=4)
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=2, batch_size=64, row_len=128,
                               split=SplitConfig(max_len=128))))
  b = next(it)
  assert it.counters["dropped_infra"] == 1 and it.counters["zero_groups"] == 1
  adv = b["advantages"][b["loss_mask"] > 0]
  # Group g: mean of valid rewards 0.5 -> advantages +0.5, -0.5, 0; group "same": all 0.
  assert sorted(set(np.round(adv, 4).tolist())) == [-0.5, 0.0, 0.5]
  assert int(b["loss_mask"].sum()) == 5 * 40  # infra-error rollout masked out entirely


@pytest.mark.parametrize("rule", ["drain", "drop"])
def test_previous_stage_rule(stream_root, rule):
  _publish(stream_root, 2, stage=0)
  _publish(stream_root, 1, stage=1, start=5)
  it = iter(StreamDataset(_cfg(stream_root, groups_per_step=1, batch_size=8, prev_stage=rule)))
  it.set_stage(1)
  next(it)
  if rule == "drop":
    assert it.counters["dropped_stage"] == 6
    assert it.last_info["ids"][0].startswith("tw-005-s1")
  else:
    assert it.counters["dropped_stage"] == 0
    assert it.last_info["ids"][0].startswith("tw-000-s0")  # older stage drained first


def test_trajectories_sampled_at_another_temperature_are_dropped(tmp_path):
  write_group(str(tmp_path), 0, "hot", [1.0, 0.0, 0.5], 0, seed=1, metadata={"temperature": 1.0})
  write_group(str(tmp_path), 0, "ok", [1.0, 0.0, 0.5], 0, seed=2, metadata={"temperature": 0.7})
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, temperature=0.7)))
  next(it)
  assert it.counters["dropped_invalid"] == 3 and it.counters["trajectories_used"] == 3
  assert all(i.startswith("tok-") for i in it.last_info["ids"])


def test_timed_out_rollouts_are_split_graded_and_every_chunk_keeps_its_advantage(tmp_path):
  # Long rollouts (400 tokens, 64-token chunks) that a stage time limit cut: kept, split into many
  # chunks, and every chunk carries its rollout's advantage (reward - group mean).
  write_group(str(tmp_path), 0, "cut", [0.25, 0.75, 0.5, 0.5], version=0, n=400, seed=7,
              statuses=["agent_timeout", "agent_timeout", "completed", "step_limit"])
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, batch_size=64)))
  b = next(it)
  assert it.counters["trajectories_used"] == 4 and it.counters["dropped_infra"] == 0
  per_chunk = {}
  for row in range(b["tokens"].shape[0]):
    for seg in set(b["segment_ids"][row].tolist()) - {0}:
      sel = (b["segment_ids"][row] == seg) & (b["loss_mask"][row] > 0)
      if sel.any():
        per_chunk[(row, seg)] = set(np.round(b["advantages"][row][sel], 4).tolist())
  assert len(per_chunk) >= 4 * 4  # >= 4 chunks per rollout
  assert all(len(v) == 1 for v in per_chunk.values())  # one advantage per chunk
  assert sorted({next(iter(v)) for v in per_chunk.values()}) == [-0.25, 0.0, 0.25]
  assert int(b["loss_mask"].sum()) == 4 * 190  # every policy token trained exactly once


def test_batches_carry_recorded_routing_aligned_with_tokens(tmp_path):
  """Routing replay: each batch row holds the recorded expert ids of its tokens, -1 on padding
  and on trajectories without a record."""
  from klong_jax.data import shards
  from tests.rl.fakes import make_trajectory
  trajs = [make_trajectory(f"g-{i}", "g", r, 0, n=100, seed=i) for i, r in enumerate([1.0, 0.0])]
  tagged = np.zeros((100, 2, 2), np.int16)
  tagged[:, :, 0] = (trajs[0].tokens % 250)[:, None]
  trajs[0].routing = tagged
  os.makedirs(tmp_path / "0")
  shards.write_shard(str(tmp_path / "0" / "w-000.array_record"), [t.to_bytes() for t in trajs])
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, routing_shape=(2, 2))))
  seen = 0
  while True:
    b = next(it)
    assert b["routing"].shape == (1, 64, 2, 2)
    seg = b["segment_ids"] > 0
    assert (b["routing"][~seg] == -1).all()
    got = b["routing"][seg]
    recorded = got[:, 0, 0] >= 0
    np.testing.assert_array_equal(got[recorded][:, 0, 0], b["tokens"][seg][recorded] % 250)
    seen += int(recorded.sum())
    if it.last_info["element_last"]:
      break
  assert seen > 0


def test_resumed_rollout_spanning_a_kill_is_judged_by_its_oldest_token(tmp_path):
  """An episode checkpointed, killed and resumed (rollout/episode_ckpt.py) mixes tokens sampled
  before the kill (version 2) and after it (version 9, the policy current at the resume): the
  hard cap measures its oldest token, and a kept one reaches the batch with per-token versions
  (what the decoupled loss and the staleness metrics read)."""
  from klong_jax.data import shards
  from tests.rl.fakes import make_trajectory

  def publish(name, seed, resumed):
    trajs = []
    for i in range(2):
      t = make_trajectory(f"{name}-{i}", f"t{name}-s0", float(i), version=2 if resumed else 9,
                          seed=seed + i, metadata={"resumed": resumed})
      sampled = np.flatnonzero(t.policy_version >= 0)
      t.policy_version[sampled[len(sampled) // 2:]] = 9  # generated after the resume
      trajs.append(t)
    path = os.path.join(tmp_path, "0", f"{name}.array_record")
    shards.write_shard(path, [t.to_bytes() for t in trajs])
    os.utime(path, ns=(seed + 1, seed + 1))

  publish("a", 0, resumed=True)
  publish("b", 10, resumed=False)
  it = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, batch_size=8, max_staleness=7)))
  it.set_policy_version(10)
  next(it)  # group a: 10 - 2 > 7, dropped whole (the hard cap); then the fresh group b
  assert it.counters["dropped_stale"] == 2 and it.counters["trajectories_used"] == 2
  it2 = iter(StreamDataset(_cfg(tmp_path, groups_per_step=1, batch_size=8, max_staleness=8)))
  it2.set_policy_version(10)
  batch = next(it2)
  assert it2.counters["dropped_stale"] == 0 and it2.counters["trajectories_used"] == 2
  pv = batch["policy_version"][batch["loss_mask"] > 0]
  assert set(np.unique(pv).tolist()) == {2, 9}
