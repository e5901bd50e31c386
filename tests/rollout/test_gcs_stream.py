"""The gs:// stream against a GCS API emulator: exclusive claims, leases, SIGKILLed workers."""

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from klong_jax.data import shards, storage
from klong_jax.rollout.gcs_stream import GcsStream
from klong_jax.rollout.stream import Stream, open_stream, read_control, write_json_atomic

pytestmark = pytest.mark.gcs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def make_stream(gcs_root):
  """GcsStream(gcs_root, name, lease_s) whose lease heartbeats stop when the test ends."""
  made = []

  def make(name, lease_s=600.0, host=None):
    s = GcsStream(gcs_root, name, lease_s=lease_s)
    s.host = host or s.host
    made.append(s)
    return s
  yield make
  for s in made:
    s.close()


def _claim_obj(root, gid):
  return json.loads(storage.read(f"{root}/ledger/claims/{gid}.json")[0])


def test_claim_publish_done_and_control(gcs_root, tmp_path, monkeypatch):
  monkeypatch.setenv("KLONG_SHARD_STAGING", str(tmp_path))
  a, b = open_stream(gcs_root, "a"), open_stream(gcs_root, "b")
  assert isinstance(a, GcsStream)
  with pytest.raises(ValueError, match="open_stream"):
    Stream(gcs_root, "a")
  shard = a.claim("g1", 0)
  assert shard.startswith(f"{gcs_root}/0/a-") and shard.endswith(".array_record")
  assert b.claim("g1", 0) is None  # held by a live claimer
  assert a.claim("g1", 0) is None  # claims are not re-entrant either
  a.publish("g1", shard, [b"r1", b"r2"])
  assert a.is_done("g1") and b.claim("g1", 0) is None
  assert shards.list_shards(gcs_root) == [shard]
  assert list(shards.read_shard(shard)) == [b"r1", b"r2"]
  assert read_control(gcs_root).stage == 0
  write_json_atomic(f"{gcs_root}/control.json", {"stage": 2, "time_limit_s": 30})
  assert read_control(gcs_root).stage == 2
  storage.write(f"{gcs_root}/control.json", b'{"stag": 1}')
  with pytest.raises(ValueError, match="unknown keys"):
    read_control(gcs_root)
  a.close()


def test_restart_and_lease_expiry_take_over_once(gcs_root, make_stream):
  a = make_stream("a")
  shard = a.claim("g1", 0)
  rec = _claim_obj(gcs_root, "g1")
  storage.write(f"{gcs_root}/ledger/claims/g1.json",
                json.dumps(dict(rec, host="pod-a", pid=os.getpid() + 10_000_000)).encode())
  assert make_stream("b").claim("g1", 0) is None  # another live pod's lease
  assert make_stream("a").claim("g1", 0) == shard  # "a" restarted: same shard path
  # A vanished pod (its own host, no renewals): its claim is taken over after the lease, by
  # exactly one of 8 concurrent reclaimers, and the group keeps its shard path.
  ghost = make_stream("ghost", lease_s=1.0, host="pod-ghost")
  ghost_shard = ghost.claim("g2", 1)
  ghost.close()
  others = [make_stream(f"o{i}") for i in range(8)]
  assert all(o.claim("g2", 1) is None for o in others)
  time.sleep(1.2)
  got = [None] * len(others)

  def take(i):
    got[i] = others[i].claim("g2", 1)
  ts = [threading.Thread(target=take, args=(i,)) for i in range(len(others))]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  assert [g for g in got if g] == [ghost_shard]
  assert _claim_obj(gcs_root, "g2")["worker"] == f"o{got.index(ghost_shard)}"


def test_heartbeat_keeps_a_long_claim(gcs_root, make_stream):
  holder = make_stream("h", lease_s=1.0, host="pod-h")
  holder.claim("g", 0)
  t0 = _claim_obj(gcs_root, "g")["renewed"]
  time.sleep(2.0)  # twice the lease: only the renewals keep it
  assert _claim_obj(gcs_root, "g")["renewed"] > t0
  assert make_stream("x").claim("g", 0) is None
  # A takeover (it looked dead to someone) makes the holder drop the claim, not fight for it.
  storage.write(f"{gcs_root}/ledger/claims/g.json", b'{"worker": "thief", "renewed": 1e18}')
  assert holder.renew() == 0 and holder._held == {}


def _count_lines(path):
  return collections.Counter(open(path).read().split()) if os.path.exists(path) else {}


@pytest.mark.subprocess
def test_fleet_with_sigkilled_workers_publishes_every_group_once(gcs_root, tmp_path):
  """M workers share N groups; K are SIGKILLed mid-publish (records written, upload pending);
  one comes back under its name, one never does (its claims expire). Every group is published
  exactly once: records read = N x R, duplicates 0; exactly the killed groups ran twice."""
  n, r, m, lease = 24, 3, 4, 3.0
  env = dict(os.environ, PYTHONPATH=REPO)

  def start(name, pause):
    staging = tmp_path / f"staging-{name}"
    argv = [sys.executable, "-m", "tests.rollout.gcs_fleet", gcs_root, name, str(n), str(r),
            str(lease), str(pause), str(tmp_path / f"runs-{name}.log")]
    return subprocess.Popen(argv, cwd=REPO, env=dict(env, KLONG_SHARD_STAGING=str(staging)),
                            stderr=subprocess.PIPE)

  t0 = time.monotonic()
  procs = {f"w{i}": start(f"w{i}", 30.0 if i < 2 else 0.3) for i in range(m)}
  killed = ["w0", "w1"]  # they stall inside their first publish: kill them there
  for name in killed:
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / f"staging-{name}" / ".*.tmp-*")):
      assert time.monotonic() < deadline and procs[name].poll() is None, \
          procs[name].stderr.read().decode()[-2000:]
      time.sleep(0.05)
    procs[name].send_signal(signal.SIGKILL)
    procs[name].wait()
  killed_groups = {name: list(_count_lines(tmp_path / f"runs-{name}.log")) for name in killed}
  assert all(len(g) == 1 for g in killed_groups.values())
  for g in killed_groups.values():  # nothing of the killed writes is visible
    assert not storage.exists(_claim_obj(gcs_root, g[0])["shard"])
  procs["w0"] = start("w0", 0.3)  # w0 restarts under its name; w1's pod is gone for good
  del procs["w1"]
  for name, p in procs.items():
    assert p.wait(timeout=300) == 0, f"{name}: {p.stderr.read().decode()[-3000:]}"
  wall = time.monotonic() - t0

  listed = shards.list_shards(gcs_root)
  ids = [rec.decode() for s in listed for rec in shards.read_shard(s)]
  runs = sum((_count_lines(tmp_path / f"runs-w{i}.log") for i in range(m)),
             collections.Counter())
  done = storage.list_objects(f"{gcs_root}/ledger/done/")
  print(f"\ngcs fleet: {n} groups x {r} records, {m} workers, {len(killed)} SIGKILLed "
        f"mid-publish (1 restarted, 1 gone; lease {lease}s): {len(listed)} shards, "
        f"{len(ids)} records read (expected {n * r}), duplicates {len(ids) - len(set(ids))}, "
        f"group runs {sum(runs.values())} (re-runs {sum(runs.values()) - n}), {wall:.1f}s")
  assert len(listed) == n and len(done) == n
  assert len(ids) == len(set(ids)) == n * r
  assert sorted(ids) == sorted(f"g{i:03d}-{j}" for i in range(n) for j in range(r))
  assert {g for g, c in runs.items() if c == 2} == {g[0] for g in killed_groups.values()}
  assert set(runs.values()) == {1, 2} and sum(runs.values()) == n + len(killed)
  for name, (g,) in killed_groups.items():  # re-run under the claim's original shard path
    claim = _claim_obj(gcs_root, g)
    assert claim["shard"] in listed and (name == "w0" or claim["worker"] != name)
  assert not any(".tmp-" in o.path for o in storage.list_objects(gcs_root + "/"))
