"""Stream exactly-once: claims, control file, and a worker SIGKILLed mid-write then restarted."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from klong_jax.data import storage
from klong_jax.data.schema import from_bytes
from klong_jax.data.shards import list_shards, read_shard
from klong_jax.rollout.stream import Stream, read_control, write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_claim_is_exclusive_and_restart_reuses_shard(tmp_path):
  a, b = Stream(str(tmp_path), "a"), Stream(str(tmp_path), "b")
  shard = a.claim("g1", 0)
  assert shard and shard.endswith("/0/a-000000.array_record")
  assert b.claim("g1", 0) is None  # Held by a live process (this one).
  a2 = Stream(str(tmp_path), "a")  # "a" restarted: its old claim is stale; same shard path.
  a2_pid = os.getpid()
  claim = json.loads((tmp_path / "ledger/claims/g1.json").read_text())
  claim["pid"] = a2_pid + 10_000_000  # A pid that cannot be alive.
  (tmp_path / "ledger/claims/g1.json").write_text(json.dumps(claim))
  assert a2.claim("g1", 0) == shard
  a2.publish("g1", shard, [b"r1", b"r2"])
  assert a2.is_done("g1") and b.claim("g1", 0) is None
  assert list(read_shard(shard)) == [b"r1", b"r2"]
  assert Stream(str(tmp_path), "a")._seq == 1


def test_stale_claim_is_taken_over_by_exactly_one_reclaimer(tmp_path, monkeypatch):
  """Reclaimers that all read the same stale claim race; one wins, and no slow loser displaces
  the winner's fresh claim (the window between reading and replacing is widened on purpose)."""
  import threading  # noqa: PLC0415

  from klong_jax.rollout import stream as stream_lib  # noqa: PLC0415
  real_loads = json.loads

  def slow_loads(*a, **k):
    out = real_loads(*a, **k)
    time.sleep(0.05)
    return out

  for rnd in range(5):
    g = f"g{rnd}"
    dead = Stream(str(tmp_path), "dead")
    shard = dead.claim(g, 0)
    path = tmp_path / "ledger" / "claims" / f"{g}.json"
    claim = json.loads(path.read_text())
    claim["pid"] = os.getpid() + 10_000_000  # its owner is gone
    path.write_text(json.dumps(claim))
    streams = [Stream(str(tmp_path), f"w{i}") for i in range(8)]
    won, barrier = [], threading.Barrier(len(streams))
    monkeypatch.setattr(stream_lib.json, "loads", slow_loads)

    def grab(s, g, won, barrier):
      barrier.wait()
      got = s.claim(g, 0)
      if got is not None:
        won.append((s.worker, got))

    threads = [threading.Thread(target=grab, args=(s, g, won, barrier)) for s in streams]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    monkeypatch.setattr(stream_lib.json, "loads", real_loads)
    assert len(won) == 1, won
    assert won[0][1] == shard  # the group keeps its shard path (exactly-once publish)
    assert json.loads(path.read_text())["worker"] == won[0][0]


def test_control_file(tmp_path):
  assert read_control(str(tmp_path)).stage == 0
  write_json_atomic(tmp_path / "control.json", {"stage": 2, "time_limit_s": 30})
  c = read_control(str(tmp_path))
  assert (c.stage, c.time_limit_s, c.policy_min_version) == (2, 30.0, -1)
  (tmp_path / "control.json").write_text('{"stag": 1}')
  with pytest.raises(ValueError, match="unknown keys"):
    read_control(str(tmp_path))


@pytest.mark.parametrize("where", ["local", pytest.param("gcs", marks=pytest.mark.gcs)])
@pytest.mark.subprocess
def test_sigkill_mid_write_then_restart(tmp_path, teacher_url, where, request):
  """The real worker, SIGKILLed while its shard is written, then restarted: one shard per group.
  On gs:// (emulator) the shard is staged locally and uploaded; nothing partial reaches GCS."""
  from klong_jax.data.tokenizer import default_tokenizer
  from klong_jax.tasks import bundled_tasks_dir
  tok = default_tokenizer(tmp_path / "tok").path
  tasks = tmp_path / "tasks"
  for t in sorted(os.listdir(bundled_tasks_dir()))[:2]:
    shutil.copytree(os.path.join(bundled_tasks_dir(), t), tasks / t)
  stream = request.getfixturevalue("gcs_root") + "/stream" if where == "gcs" else None
  env = {**os.environ, "PYTHONPATH": REPO}  # (after the emulator fixture set its env vars)
  if where == "gcs":
    env["KLONG_SHARD_STAGING"] = str(tmp_path / "staging")
    temps = str(tmp_path / "staging" / ".*tmp-*")
  else:
    stream = str(tmp_path / "stream")
    temps = os.path.join(stream, "1", ".*tmp-*")
  write_json_atomic(storage.join(stream, "control.json"), {"stage": 1, "time_limit_s": 60})
  base = [sys.executable, "-m", "klong_jax.rollout.worker", f"--server={teacher_url}",
          f"--tasks={tasks}", f"--stream={stream}", f"--tokenizer={tok}", "--group_size=1",
          "--backend=local", "--worker=w", "--max_steps=6"]
  log = open(tmp_path / "worker.log", "w")
  proc = subprocess.Popen(base + ["--pause_before_publish_s=30"], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.time() + 90
  while not glob.glob(temps):  # A shard is being written.
    assert time.time() < deadline and proc.poll() is None, \
        "worker never started a shard: " + (tmp_path / "worker.log").read_text()[-2000:]
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log.close()
  assert list_shards(stream) == []  # Nothing partial is visible to readers.
  subprocess.run(base, env=env, cwd=REPO, check=True, timeout=120,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert not glob.glob(temps)  # The restart removed the killed write.
  shards = list_shards(stream)
  recs = [from_bytes(r) for s in shards for r in read_shard(s)]
  assert len(shards) == 2 and len(recs) == 2
  assert sorted(r.id for r in recs) == sorted({r.id for r in recs})  # No duplicates.
  assert {r.group_id for r in recs} == {f"{t}-s1-r0" for t in os.listdir(tasks)}
  assert all(r.stage == 1 and r.status == "completed" and r.reward == 1.0 for r in recs)
  assert all(r.prefix_end > 0 and r.num_loss_tokens > 0 for r in recs)
  # A third run finds everything done and writes nothing.
  subprocess.run(base, env=env, cwd=REPO, check=True, timeout=60,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert list_shards(stream) == shards
