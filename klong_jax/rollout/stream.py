"""The trajectory stream directory: control file, work claims, done-ledger, atomic shards.

Layout under `<stream>`:
  control.json                       {"stage", "time_limit_s", "policy_min_version"} (trainer)
  <stage>/<worker>-<seq>.array_record one shard per finished group (temp name + rename)
  ledger/claims/<group_id>.json      who runs a group and which shard path it will publish
  ledger/done/<group_id>.json        written after the shard is published
  ledger/episodes/<group_id>/<i>/    a running rollout's checkpoints (episode_ckpt.py), deleted
                                     after the group's shard is published
Exactly-once: a group's shard path is fixed when it is first claimed; a restarted worker that
finds the shard already published only writes the done entry, otherwise it re-runs the group
and publishes to the same path. Claims are taken with an atomic hard link (local filesystems);
a `gs://` stream (`open_stream`) takes them with GCS preconditions instead (gcs_stream.py), since
gcsfuse has no hard links. control.json and done entries on gs:// are whole-object writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from klong_jax.agent.budget import CLOCKS
from klong_jax.data import storage
from klong_jax.data.shards import ShardWriter
from klong_jax.sandbox.base import pid_alive


@dataclasses.dataclass(frozen=True)
class Control:
  """Trainer-set rollout instructions (progressive RL stage and its time limit)."""

  stage: int = 0
  time_limit_s: float | None = None
  policy_min_version: int = -1
  tasks: tuple[str, ...] = ()  # Task-id globs of the stage's task mix (empty: every task).
  # The clock time_limit_s is on (agent/budget.py: wall | tokens); "": the workers' own.
  budget_clock: str = ""


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to a temp file in the same dir and renames it into place (gs://: one write)."""
  if storage.is_gcs(path):
    storage.write(os.fspath(path), json.dumps(obj).encode())
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_control(stream: str) -> Control:
  """Reads `<stream>/control.json` (defaults when missing); bad content raises ValueError."""
  if storage.is_gcs(stream):
    p: Any = storage.join(stream, "control.json")
    got = storage.read(p)
    text = None if got is None else got[0].decode()
  else:
    p = Path(stream) / "control.json"
    text = p.read_text() if p.exists() else None
  if text is None:
    return Control()
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{p} is not valid JSON ({e}); write it atomically (temp + rename)") from None
  unknown = set(d) - {f.name for f in dataclasses.fields(Control)}
  if unknown:
    raise ValueError(f"{p}: unknown keys {sorted(unknown)}; allowed: stage, time_limit_s, "
                     "policy_min_version, tasks, budget_clock")
  clock = str(d.get("budget_clock") or "")
  if clock and clock not in CLOCKS:
    raise ValueError(f"{p}: budget_clock {clock!r} must be one of {CLOCKS} (or absent)")
  tl = d.get("time_limit_s")
  return Control(stage=int(d.get("stage", 0)), time_limit_s=None if tl is None else float(tl),
                 policy_min_version=int(d.get("policy_min_version", -1)),
                 tasks=tuple(str(t) for t in d.get("tasks") or ()), budget_clock=clock)


class Stream:
  """One worker's view of the stream dir: claim groups, publish shards, mark them done."""

  def __init__(self, root: str, worker: str):
    if storage.is_gcs(root):
      raise ValueError(f"{root} is on GCS: open it with stream.open_stream (claims by GCS "
                       "preconditions; hard links do not exist there)")
    if not worker or "/" in worker:
      raise ValueError(f"worker name {worker!r} must be non-empty without '/'")
    self.root = Path(root)
    self.worker = worker
    self.claims = self.root / "ledger" / "claims"
    self.done = self.root / "ledger" / "done"
    self.claims.mkdir(parents=True, exist_ok=True)
    self.done.mkdir(parents=True, exist_ok=True)
    self.host = socket.gethostname()
    self._seq = self._next_seq()

  def _next_seq(self) -> int:
    seqs = [-1]
    for p in self.claims.glob("*.json"):
      try:
        c = json.loads(p.read_text())
      except (OSError, json.JSONDecodeError):
        continue
      name = Path(c.get("shard", "")).name
      prefix = f"{self.worker}-"
      if name.startswith(prefix) and name[len(prefix):].split(".")[0].isdigit():
        seqs.append(int(name[len(prefix):].split(".")[0]))
    return max(seqs) + 1

  def is_done(self, group_id: str) -> bool:
    return (self.done / f"{group_id}.json").exists()

  def _stale(self, claim: dict[str, Any]) -> bool:
    """A claim by a dead process on this host, or by this same worker name (we restarted)."""
    if claim.get("worker") == self.worker and claim.get("pid") != os.getpid():
      return True
    return claim.get("host") == self.host and not pid_alive(int(claim.get("pid", -1)))

  def claim(self, group_id: str, stage: int) -> str | None:
    """Claims a group; returns its shard path, or None if done or held by a live worker.

    A fresh claim is an atomic create-if-absent (hard link). A stale claim is taken over at most
    once per claim generation: reclaimers race to create a takeover token named by the stale
    claim's inode and content (hard link again), and only the winner replaces the claim, so a
    slow reclaimer that read the same stale claim can never displace the winner's fresh one.
    """
    if self.is_done(group_id):
      return None
    path = self.claims / f"{group_id}.json"
    shard, token = None, None
    if path.exists():
      try:
        ino = path.stat().st_ino
        raw = path.read_bytes()
        old = json.loads(raw)
      except (OSError, json.JSONDecodeError):
        return None
      if not self._stale(old):
        return None
      shard = old.get("shard")
      gen = hashlib.sha256(raw).hexdigest()[:16]
      token = path.with_name(f".{group_id}.takeover-{ino}-{gen}")
    if shard is None:
      shard = str(self.root / str(stage) / f"{self.worker}-{self._seq:06d}.array_record")
      self._seq += 1
    rec = {"group_id": group_id, "worker": self.worker, "host": self.host, "pid": os.getpid(),
           "shard": shard, "stage": stage}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(rec))
    try:
      if token is None:
        os.link(tmp, path)  # Atomic create-if-absent.
      else:
        os.link(tmp, token)  # One winner per stale generation ...
        os.replace(tmp, path)  # ... which alone replaces the stale claim.
    except FileExistsError:
      return None
    finally:
      tmp.unlink(missing_ok=True)
    return shard

  def published(self, shard: str) -> bool:
    return Path(shard).exists()

  def publish(self, group_id: str, shard: str, records: list[bytes],
              pause_before_publish_s: float = 0.0) -> None:
    """Writes the group's records to its shard atomically, then marks the group done."""
    if not self.published(shard):
      with ShardWriter(shard) as w:
        for r in records:
          w.write(r)
        if pause_before_publish_s:  # Test hook: a window to SIGKILL a worker mid-write.
          import time
          time.sleep(pause_before_publish_s)
    self.mark_done(group_id, shard, len(records))

  def mark_done(self, group_id: str, shard: str, n: int) -> None:
    write_json_atomic(self.done / f"{group_id}.json",
                      {"group_id": group_id, "shard": shard, "records": n, "worker": self.worker})
    for token in self.claims.glob(f".{group_id}.takeover-*"):  # Done: no takeover can follow.
      token.unlink(missing_ok=True)


def open_stream(root: str, worker: str, lease_s: float | None = None) -> Stream:
  """The stream at `root` for `worker`: POSIX for a local dir, GCS-native for `gs://`."""
  if storage.is_gcs(root):
    from klong_jax.rollout.gcs_stream import DEFAULT_LEASE_S, GcsStream  # noqa: PLC0415
    return GcsStream(root, worker, DEFAULT_LEASE_S if lease_s is None else lease_s)
  return Stream(root, worker)
