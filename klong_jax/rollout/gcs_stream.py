"""The trajectory stream on `gs://` (no gcsfuse): claims by GCS preconditions, renewed leases.

Same layout and exactly-once rules as stream.py (claims/<group>.json fixes a group's shard path;
done/<group>.json follows the published shard), with the POSIX primitives replaced:
  claim        create the claim object with ifGenerationMatch=0: of N concurrent claimers exactly
               one request succeeds (GCS serialises writes to one object name).
  take over    a stale claim is overwritten with ifGenerationMatch=<the generation read>, so of N
               reclaimers only one wins, and never over a claim renewed meanwhile.
  publish      the shard is staged locally and uploaded with ifGenerationMatch=0: visible only
               when complete, never replaced, so a group's shard is published at most once.
Stale: the base rules (this worker name restarted; a dead pid on this host), plus an expired
lease: the holder rewrites its claims every `lease_s / 3` (compare-and-swap on its own
generation), so the claims of a pod that vanished (a new pod gets a new name) expire after
`lease_s` and another worker re-runs those groups. A retried request whose first attempt won
reads as a lost race, so claims carry a nonce and a loser re-reads the object to be sure.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from klong_jax.data import storage
from klong_jax.rollout.stream import Stream

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 300.0


class GcsStream(Stream):
  """One worker's view of a gs:// stream (see the module docstring); use `stream.open_stream`."""

  def __init__(self, root: str, worker: str, lease_s: float = DEFAULT_LEASE_S):
    if not worker or "/" in worker:
      raise ValueError(f"worker name {worker!r} must be non-empty without '/'")
    if lease_s <= 0:
      raise ValueError(f"claim lease must be > 0 s, got {lease_s}")
    storage.split(root)  # Names a bucket.
    self.root = root.rstrip("/")
    self.worker = worker
    self.claims = storage.join(self.root, "ledger", "claims")
    self.done = storage.join(self.root, "ledger", "done")
    self.host = socket.gethostname()
    self.lease_s = float(lease_s)
    self._held: dict[str, tuple[int, dict[str, Any]]] = {}  # claim path -> (generation, record)
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    # Shard numbers start at the clock in microseconds: unique over this name's restarts without
    # reading every claim (the POSIX stream scans them; a bucket may hold tens of thousands).
    self._seq = time.time_ns() // 1000

  def _claim_path(self, group_id: str) -> str:
    return storage.join(self.claims, f"{group_id}.json")

  def is_done(self, group_id: str) -> bool:
    return storage.exists(storage.join(self.done, f"{group_id}.json"))

  def _stale(self, claim: dict[str, Any]) -> bool:
    """The base rules, or a lease not renewed for `lease_s` (by the claim's own clock field)."""
    if super()._stale(claim):
      return True
    renewed = float(claim.get("renewed", claim.get("time", 0.0)))
    return time.time() - renewed > float(claim.get("lease_s", self.lease_s))

  def claim(self, group_id: str, stage: int) -> str | None:
    """Claims a group; returns its shard path, or None if done or held by a live worker."""
    if self.is_done(group_id):
      return None
    path = self._claim_path(group_id)
    got = storage.read(path)
    shard, generation = None, 0
    if got is not None:
      try:
        old = json.loads(got[0])
      except json.JSONDecodeError:
        return None  # Objects are written whole: this is foreign junk, not a torn claim.
      if not self._stale(old):
        return None
      shard, generation = old.get("shard"), got[1]
    if shard is None:
      shard = storage.join(self.root, str(stage), f"{self.worker}-{self._seq:06d}.array_record")
      self._seq += 1
    now = time.time()
    rec = {"group_id": group_id, "worker": self.worker, "host": self.host, "pid": os.getpid(),
           "shard": shard, "stage": stage, "time": now, "renewed": now, "lease_s": self.lease_s,
           "nonce": uuid.uuid4().hex}
    data = json.dumps(rec).encode()
    gen = storage.create(path, data) if generation == 0 else \
        storage.replace(path, data, generation)
    if gen is None:
      cur = storage.read(path)  # Lost the race, or a retried request of ours already won.
      if cur is None or _nonce(cur[0]) != rec["nonce"]:
        return None
      gen = cur[1]
    with self._lock:
      self._held[path] = (gen, rec)
    self._start_heartbeat()
    return shard

  def published(self, shard: str) -> bool:
    return storage.exists(shard)

  def mark_done(self, group_id: str, shard: str, n: int) -> None:
    storage.write(storage.join(self.done, f"{group_id}.json"),
                  json.dumps({"group_id": group_id, "shard": shard, "records": n,
                              "worker": self.worker}).encode())
    with self._lock:
      self._held.pop(self._claim_path(group_id), None)

  # -- leases -----------------------------------------------------------------------------------

  def renew(self) -> int:
    """Rewrites every held claim's `renewed` time (CAS on its generation); returns how many.

    A claim another worker took over (we looked dead to it) is dropped with a warning; our shard
    upload then loses or wins the if-absent race, so the group is still published once.
    """
    with self._lock:
      held = dict(self._held)
    n = 0
    for path, (gen, rec) in held.items():
      rec = dict(rec, renewed=time.time())
      new = storage.replace(path, json.dumps(rec).encode(), gen)
      with self._lock:
        if path not in self._held:
          continue  # Done meanwhile.
        if new is None:
          cur = storage.read(path)
          if cur is not None and _nonce(cur[0]) == rec["nonce"]:
            self._held[path] = (cur[1], rec)  # Our retried write had landed.
            n += 1
            continue
          log.warning("%s: claim %s was taken over by another worker", self.worker, path)
          self._held.pop(path)
        else:
          self._held[path] = (new, rec)
          n += 1
    return n

  def _start_heartbeat(self) -> None:
    if self._thread is None or not self._thread.is_alive():
      self._thread = threading.Thread(target=self._beat, name="klong-claim-lease", daemon=True)
      self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.lease_s / 3):
      try:
        self.renew()
      except Exception:  # A GCS hiccup must not kill the worker; the next beat retries.
        log.exception("%s: renewing claims failed", self.worker)

  def close(self) -> None:
    """Stops renewing (held claims then expire after `lease_s`)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)


def _nonce(data: bytes) -> str | None:
  try:
    return json.loads(data).get("nonce")
  except (json.JSONDecodeError, AttributeError):
    return None
