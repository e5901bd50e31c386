"""GCS primitives against a real GCS API emulator: preconditions, races, atomic uploads, shards."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from klong_jax.data import shards, storage

pytestmark = pytest.mark.gcs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_preconditions_listing_and_transfer(gcs_root, tmp_path):
  p = storage.join(gcs_root, "a", "x.json")
  assert storage.read(p) is None and not storage.exists(p)
  g1 = storage.create(p, b"1")
  assert g1 and storage.create(p, b"2") is None and storage.read(p) == (b"1", g1)
  assert storage.replace(p, b"3", g1 + 1) is None  # stale generation: refused
  g2 = storage.replace(p, b"3", g1)
  assert g2 and g2 != g1 and storage.replace(p, b"4", g1) is None
  assert storage.read(p) == (b"3", g2)
  storage.write(storage.join(gcs_root, "a", "b", "y"), b"y")
  storage.write(storage.join(gcs_root, "c", "z"), b"z")
  assert [o.path[len(gcs_root) + 1:] for o in storage.list_objects(gcs_root + "/")] == \
      ["a/b/y", "a/x.json", "c/z"]
  assert storage.list_dirs(gcs_root) == ["a", "c"]
  local = tmp_path / "f.bin"
  local.write_bytes(os.urandom(1000))
  dst = storage.join(gcs_root, "f.bin")
  assert storage.upload(local, dst) and not storage.upload(local, dst)  # never replaced
  storage.download(dst, tmp_path / "g" / "f.bin")
  assert (tmp_path / "g" / "f.bin").read_bytes() == local.read_bytes()
  with pytest.raises(FileNotFoundError):
    storage.download(storage.join(gcs_root, "nope"), tmp_path / "nope")
  assert storage.delete_prefix(gcs_root + "/a/") == 2 and not storage.exists(p)


def test_gs_shards_write_list_read(gcs_root, tmp_path, monkeypatch):
  monkeypatch.setenv("KLONG_SHARD_STAGING", str(tmp_path / "staging"))
  out = shards.write_shard(f"{gcs_root}/0/w-1.array_record", [b"r1", b"r2"])
  assert out == f"{gcs_root}/0/w-1.array_record"
  shards.write_shard(f"{gcs_root}/1/w-2.array_record", [b"r3"])
  storage.write(f"{gcs_root}/1/notes.txt", b"not a shard")
  assert shards.list_shards(gcs_root) == [out, f"{gcs_root}/1/w-2.array_record"]
  assert shards.list_shards(f"{gcs_root}/0", "*" + shards.SUFFIX) == [out]
  assert list(shards.read_shard(out)) == [b"r1", b"r2"] and shards.num_records(out) == 2
  assert os.listdir(tmp_path / "staging") == []  # staged temp removed after the upload
  with shards.ShardWriter(out) as w:  # a published shard is immutable: the upload is refused
    w.write(b"other")
  assert w.uploaded is False and list(shards.read_shard(out)) == [b"r1", b"r2"]
  storage.write(f"{gcs_root}/0/bad.array_record", b"garbage")
  with pytest.raises(shards.ShardError, match=f"{gcs_root}/0/bad.array_record"):
    shards.num_records(f"{gcs_root}/0/bad.array_record")


_CREATE = textwrap.dedent("""
  import json, random, sys
  from klong_jax.data import storage
  root, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
  order = list(range(n))
  random.Random(me).shuffle(order)
  print("ready", flush=True)
  sys.stdin.readline()  # the start line: every racer begins at once
  won = [i for i in order if storage.create(f"{root}/g{i}", me.encode()) is not None]
  print(json.dumps(won))
""")


def _race_order(me: str, n: int) -> list[int]:
  order = list(range(n))
  random.Random(me).shuffle(order)
  return order


@pytest.mark.subprocess
def test_concurrent_create_has_exactly_one_winner(gcs_root):
  """6 processes x 4 threads race to create the same 30 objects: one winner each, its bytes."""
  n, procs, threads = 30, 6, 4
  env = dict(os.environ, PYTHONPATH=REPO)
  ps = [subprocess.Popen([sys.executable, "-c", _CREATE, gcs_root, f"p{i}", str(n)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(procs)]
  won: dict[str, list[int]] = {}
  start = threading.Barrier(threads + 1)

  def thread(me):
    start.wait()
    won[me] = [i for i in _race_order(me, n) if storage.create(f"{gcs_root}/g{i}", me.encode())]
  ts = [threading.Thread(target=thread, args=(f"t{i}",)) for i in range(threads)]
  for t in ts:
    t.start()
  # Hold the race until every process has imported and is waiting: under load a process that
  # starts late would otherwise find every object taken (CI saw one racer win all 30).
  for p in ps:
    assert p.stdout.readline().strip() == "ready"
  for p in ps:
    p.stdin.write("go\n")
    p.stdin.flush()
  start.wait()
  for t in ts:
    t.join()
  for i, p in enumerate(ps):
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    won[f"p{i}"] = json.loads(out)
  winners = [(i, me) for me, gs in won.items() for i in gs]
  assert sorted(i for i, _ in winners) == list(range(n))  # each object created exactly once
  for i, me in winners:
    assert storage.read(f"{gcs_root}/g{i}")[0] == me.encode()
  assert sum(1 for me in won if won[me]) >= 2, "the race was not concurrent"


_SLOW_UPLOAD = textwrap.dedent("""
  import sys, time
  from klong_jax.data import storage
  class Slow:
    def __init__(self, n): self.n, self.pos = n, 0
    def read(self, k=-1):
      k = self.n - self.pos if k < 0 else min(k, self.n - self.pos)
      self.pos += k
      if self.pos > 300_000:
        print("sent", flush=True)
        time.sleep(60)
      return b"x" * k
    def tell(self): return self.pos
    def seek(self, p, w=0): self.pos = p
  blob = storage._blob(sys.argv[1])
  blob.chunk_size = 256 * 1024  # resumable upload, chunk by chunk
  blob.upload_from_file(Slow(2_000_000), size=2_000_000, if_generation_match=0)
""")


@pytest.mark.subprocess
def test_upload_killed_midway_leaves_no_object(gcs_root):
  """A resumable upload SIGKILLed after its first chunk was accepted creates no object."""
  path = f"{gcs_root}/big.array_record"
  p = subprocess.Popen([sys.executable, "-c", _SLOW_UPLOAD, path], stdout=subprocess.PIPE,
                       text=True, env=dict(os.environ, PYTHONPATH=REPO))
  try:
    assert p.stdout.readline().strip() == "sent"
    time.sleep(0.5)
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not storage.exists(path) and storage.list_objects(gcs_root + "/") == []
  assert storage.create(path, b"complete") is not None  # the name is still free
