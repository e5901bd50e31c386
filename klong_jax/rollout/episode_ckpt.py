"""Episode checkpoints: a running rollout persists its state so a crash or preemption resumes it.

Layout under the stream (local dir or gs://), one directory per rollout of a claimed group:
  ledger/episodes/<group_id>/<index>/state.json         the last checkpoint (below)
  ledger/episodes/<group_id>/<index>/workspace-<n>.tar  the sandbox's /workspace at that step
                                                        (docker: the engine's archive stream)
  ledger/episodes/<group_id>/<index>/messages-<n>.json  the log's messages since the previous
                                                        checkpoint (written once, never again)
  ledger/episodes/<group_id>/<index>/progress.json      steps done / agent time, every step
  ledger/episodes/<group_id>/<index>/record.bin         the finished, graded Trajectory bytes
state.json = {"episode": scaffold.EpisodeState but its messages (counters; window; "clock":
{"elapsed_s"}), "segments": the message segments (exact token ids, logprobs and policy versions
per sampled turn), "workspace": its tar, "resumes": [one entry per resume], "owner", "seq"}.
The tar and the new segment are written first under new names, then state.json names them
(local: temp + rename; gs://: then a compare-and-swap on state.json's generation), so a reader
always finds a state with the workspace and the log of the same step.

A worker that claims a group (fresh, restarted, or taking over a stale claim: stream.py) resumes
each unfinished rollout from its checkpoint: the workspace is unpacked into a fresh sandbox and
generation goes on with the server's current policy (recorded tokens keep their versions); the
agent clock goes on from the recorded elapsed time, so downtime is not charged. A finished
rollout's record is kept, so a restarted group neither reruns nor regrades it; the directory is
deleted once the group's shard is published. On gs:// a worker whose claim was taken over fails
its next compare-and-swap (CheckpointFenced) and abandons the group instead of racing the new
owner. Only files are restored: processes the agent left running are gone (the agent is told).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from typing import Any

from klong_jax.agent import scaffold
from klong_jax.data import storage
from klong_jax.sandbox import base as sandbox_lib

log = logging.getLogger(__name__)

RESUMED_NOTE = (
    "Note: this episode was interrupted (infrastructure) and resumed from a checkpoint after "
    "step {step}. Your files in /workspace are as they were then; processes you had started "
    "are no longer running.")


class CheckpointFenced(RuntimeError):
  """Another worker took this episode over (its claim went stale): stop, publish nothing."""


@dataclasses.dataclass(frozen=True)
class CkptConfig:
  """When a running episode is checkpointed (after an action; 0 disables that trigger)."""

  every_steps: int = 0
  every_s: float = 0.0

  def __post_init__(self) -> None:
    if self.every_steps < 0 or self.every_s < 0:
      raise ValueError(f"episode checkpoint interval must be >= 0, got every_steps="
                       f"{self.every_steps}, every_s={self.every_s} (0 = off)")

  @property
  def enabled(self) -> bool:
    return bool(self.every_steps or self.every_s)


def episode_dir(stream: str, group_id: str, index: int | None = None) -> str:
  """Where a group's (or one rollout's) checkpoints live in the stream."""
  parts = ["ledger", "episodes", group_id] + ([str(index)] if index is not None else [])
  return storage.join(stream, *parts)


def delete_group(stream: str, group_id: str) -> None:
  """Removes a group's checkpoints (after its shard is published: they are never read again)."""
  d = episode_dir(stream, group_id)
  if storage.is_gcs(d):
    storage.delete_prefix(d + "/")
  else:
    shutil.rmtree(d, ignore_errors=True)


def _read(path: str) -> tuple[bytes, int] | None:
  if storage.is_gcs(path):
    return storage.read(path)
  try:
    with open(path, "rb") as f:
      return f.read(), 0
  except FileNotFoundError:
    return None


def _write_atomic(path: str, data: bytes) -> None:
  """Local: temp + rename; gs://: one object write (atomic)."""
  if storage.is_gcs(path):
    storage.write(path, data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _delete(path: str) -> None:
  if storage.is_gcs(path):
    storage.delete(path)
  else:
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Messages without bookkeeping keys (for comparing a checkpoint's prefix with the task's)."""
  return [{k: v for k, v in m.items() if k not in ("klong", "meta")} for m in messages]


def _backend(sb: Any) -> str:
  backend = (sb.info() if hasattr(sb, "info") else {}).get("backend")
  if backend not in ("docker", "local"):
    raise ValueError(f"episode checkpoints archive docker and local sandboxes; {sb!r} is "
                     f"{backend!r}: turn them off (--ckpt_every_steps=0 --ckpt_every_s=0)")
  return backend


def archive_workspace(sb: Any, host_tar: str) -> None:
  """Tars the sandbox's /workspace into `host_tar` (modes, symlinks, .git kept; entries `./...`).

  Docker: the engine streams the archive out (nothing staged inside the size-limited
  workspace); local: the mapped host directory is tarred directly.
  """
  if _backend(sb) == "docker":
    try:
      chunks, _ = sb.container.get_archive(f"{sandbox_lib.WORKSPACE}/.")
      with open(host_tar, "wb") as f:
        for chunk in chunks:
          f.write(chunk)
    except Exception as e:  # noqa: BLE001 - any engine failure is the sandbox's
      raise sandbox_lib.SandboxError(f"archiving the workspace of {sb.name} failed: {e}") from e
    return
  with tarfile.open(host_tar, "w") as tar:
    tar.add(sb.root, arcname=".")


def restore_workspace(sb: Any, data: bytes) -> None:
  """Unpacks an `archive_workspace` tar over the sandbox's /workspace."""
  if _backend(sb) == "docker":
    try:
      ok = sb.container.put_archive(sandbox_lib.WORKSPACE, data)
    except Exception as e:  # noqa: BLE001
      raise sandbox_lib.SandboxError(f"restoring the workspace of {sb.name} failed: {e}") from e
    if not ok:
      raise sandbox_lib.SandboxError(f"restoring the workspace of {sb.name} was refused")
    return
  with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    tar.extractall(sb.root, filter="tar")  # (no absolute paths, nothing outside the root)


class EpisodeCheckpointer:
  """Checkpoints of one rollout (`index`) of a claimed group, written by worker `owner`."""

  def __init__(self, stream: str, group_id: str, index: int, owner: str, cfg: CkptConfig):
    self.dir = episode_dir(stream, group_id, index)
    self.owner, self.cfg = owner, cfg
    self.state_path = storage.join(self.dir, "state.json")
    self.gcs = storage.is_gcs(self.dir)
    self._gen: int | None = None    # state.json generation we last wrote or read (gs:// fence).
    self._workspace: str | None = None
    self._segments: list[str] = []  # messages-*.json objects holding the log, in order
    self._n_saved = 0               # messages they hold
    self._seq = 0
    self.resumes: list[dict[str, Any]] = []
    self._last_step = 0
    self._last_s = 0.0
    self.saves = self.skipped = 0

  # -- finished records -------------------------------------------------------------------------

  def load_record(self) -> bytes | None:
    got = _read(storage.join(self.dir, "record.bin"))
    return None if got is None else got[0]

  def save_record(self, record: bytes) -> None:
    _write_atomic(storage.join(self.dir, "record.bin"), record)

  # -- resume -----------------------------------------------------------------------------------

  def resume(self, sb: Any, prefix: list[dict[str, Any]] | None = None
             ) -> scaffold.EpisodeState | None:
    """Loads the last checkpoint into `sb` (workspace) and returns its state, or None if none.

    Records the resume (worker, step, agent time; the steps a dead worker did after the
    checkpoint, from progress.json) in state.json at once, which also takes the gs:// fence.
    A checkpoint that cannot be used (unreadable, another klong-jax version, or a fixed prefix
    other than `prefix`: the task changed) is logged and the episode starts afresh (a worker
    fleet must not crash-loop on it); the fresh run's first checkpoint replaces it.
    """
    got = _read(self.state_path)
    if got is None:
      return None
    self._gen = got[1]
    try:
      doc = json.loads(got[0])
      episode = dict(doc["episode"])
      segments = list(doc.get("segments") or [])
      if segments:
        episode["messages"] = []
        for seg in segments:
          part = _read(storage.join(self.dir, seg))
          if part is None:
            raise ValueError(f"its message segment {seg} is missing")
          episode["messages"] += json.loads(part[0])
        if len(episode["messages"]) != doc["n_messages"]:
          raise ValueError(f"its segments hold {len(episode['messages'])} messages, not "
                           f"{doc['n_messages']}")
      ep = scaffold.EpisodeState.from_json(episode)
      if prefix is not None and _plain(ep.messages[:ep.prefix_messages]) != _plain(prefix):
        raise ValueError("its fixed prefix differs from the task's (the task changed)")
      workspace = doc.get("workspace")
      tar = _read(storage.join(self.dir, workspace)) if workspace else None
      if workspace and tar is None:
        raise ValueError(f"its workspace archive {workspace} is missing")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      log.error("%s is not a usable episode checkpoint (%s): the episode starts afresh",
                self.state_path, e)
      return None
    self._workspace, self._seq = workspace, int(doc.get("seq", 0))
    self._segments, self._n_saved = segments, len(ep.messages) if segments else 0
    if tar is not None:
      restore_workspace(sb, tar[0])
    elapsed = scaffold.clock_elapsed(ep.clock)
    prog = _read(storage.join(self.dir, "progress.json"))
    p = json.loads(prog[0]) if prog is not None else {}
    lost_steps = max(0, int(p.get("step", ep.steps)) - ep.steps)
    lost_s = max(0.0, float(p.get("elapsed_s", elapsed)) - elapsed) if lost_steps else 0.0
    self.resumes = list(doc.get("resumes") or []) + [{
        "worker": self.owner, "from_worker": doc.get("owner"), "at_step": ep.steps,
        "not_repeated": [1, ep.steps] if ep.steps else [], "elapsed_s": round(elapsed, 3),
        "lost_steps": lost_steps, "lost_s": round(lost_s, 3), "time": time.time()}]
    self._last_step, self._last_s = ep.steps, elapsed
    ep.messages.append({"role": "user", "content": RESUMED_NOTE.format(step=ep.steps)})
    self._put_state(doc["episode"], self._workspace, self._segments, doc.get("n_messages"))
    # (the note is in the next save's segment)
    return ep

  def metadata(self) -> dict[str, Any]:
    """What the trajectory records about resumes: whether, how often, which steps were kept."""
    if not self.resumes:
      return {"resumed": False}
    return {"resumed": True, "resume_count": len(self.resumes), "resumes": self.resumes,
            "checkpoints": self.saves, "checkpoints_skipped": self.skipped}

  # -- saving -----------------------------------------------------------------------------------

  def due(self, st: scaffold.EpisodeState) -> bool:
    c = self.cfg
    return ((c.every_steps and st.steps - self._last_step >= c.every_steps) or
            (c.every_s and scaffold.clock_elapsed(st.clock) - self._last_s >= c.every_s))

  def on_step(self, st: scaffold.EpisodeState, sb: Any) -> None:
    """The scaffold's per-action hook: progress always, a checkpoint when one is due. A failed
    write (sandbox, storage) is logged and skipped, never the episode's end; only a fence is."""
    elapsed = scaffold.clock_elapsed(st.clock)
    try:
      _write_atomic(storage.join(self.dir, "progress.json"), json.dumps(
          {"owner": self.owner, "step": st.steps, "elapsed_s": elapsed}).encode())
      if self.cfg.enabled and self.due(st):
        self.save(st, sb)
    except CheckpointFenced:
      raise
    except Exception:  # noqa: BLE001 - the next interval retries; the episode goes on.
      self.skipped += 1
      log.exception("%s: episode checkpoint after step %d failed", self.dir, st.steps)

  def save(self, st: scaffold.EpisodeState, sb: Any) -> None:
    """Archives the workspace and appends the new messages as a segment, then points
    state.json at both (never one without the other). The log is written once, in segments,
    not again at every checkpoint: a multi-hour log with routing records is large."""
    self._seq += 1
    name = f"workspace-{self._seq:06d}-{uuid.uuid4().hex[:6]}.tar"
    path = storage.join(self.dir, name)
    if self.gcs:  # Staged on local disk, then one if-absent upload.
      with tempfile.TemporaryDirectory(prefix="klong-ckpt-") as d:
        archive_workspace(sb, os.path.join(d, "ws.tar"))
        if not storage.upload(os.path.join(d, "ws.tar"), path):
          raise CheckpointFenced(f"{path} exists: another worker writes this episode")
    else:  # Temp name in place, then rename.
      os.makedirs(self.dir, exist_ok=True)
      tmp = storage.join(self.dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
      try:
        archive_workspace(sb, tmp)
        os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
    new = st.messages[self._n_saved:]
    segments = list(self._segments)
    if new:
      segments.append(f"messages-{self._seq:06d}-{uuid.uuid4().hex[:6]}.json")
      _write_atomic(storage.join(self.dir, segments[-1]), json.dumps(new).encode())
    episode = {k: v for k, v in st.to_json().items() if k != "messages"}
    old = self._workspace
    try:
      self._put_state(episode, name, segments, len(st.messages))
    except CheckpointFenced:
      _delete(path)
      if new:
        _delete(storage.join(self.dir, segments[-1]))
      raise
    self._segments, self._n_saved = segments, len(st.messages)
    if old and old != name:
      _delete(storage.join(self.dir, old))
    self._workspace = name
    self._last_step, self._last_s = st.steps, scaffold.clock_elapsed(st.clock)
    self.saves += 1

  def _put_state(self, episode: dict[str, Any], workspace: str | None,
                 segments: list[str] | None = None, n_messages: int | None = None) -> None:
    """state.json: the episode (its messages inline, or in `segments`), workspace, resumes."""
    data = json.dumps({"format": 1, "owner": self.owner, "seq": self._seq,
                       "workspace": workspace, "episode": episode, "segments": segments or [],
                       "n_messages": n_messages, "resumes": self.resumes,
                       "saved": time.time()}).encode()
    if not self.gcs:
      _write_atomic(self.state_path, data)
      return
    gen = (storage.create(self.state_path, data) if self._gen is None else
           storage.replace(self.state_path, data, self._gen))
    if gen is None:
      cur = storage.read(self.state_path)  # A retried request of ours may have won.
      if cur is None or cur[0] != data:
        raise CheckpointFenced(f"{self.state_path} was rewritten by another worker (claim "
                               "taken over): abandoning this episode")
      gen = cur[1]
    self._gen = gen
