"""Multi-host serving: process 0 schedules, every process runs the same device calls.

One JAX process per TPU host (jax.distributed, parallel/mesh.maybe_initialize_distributed) holds
its chips' shards of the weights and of the page pool. Process 0 (the leader) owns the HTTP front
end and the paged engine's scheduler; before each device call it publishes that call's host-side
inputs as one small message (`encode`: which call, the batch's numpy arrays, the policy version,
and for a weight swap the policy path) and the followers (`follow`) run the identical call.

The channel is the jax.distributed coordination service's key-value store (gRPC to process 0,
which hosts it), not a device broadcast (`multihost_utils.broadcast_one_to_all`): it compiles no
program per message shape, and every wait on it has a timeout, so a follower that died or hangs
between calls, or that refuses a call (another config, another weights version, a sequence gap),
is a `LinkError` naming it rather than a broadcast that blocks forever. Each message is acked
(`ok` or the follower's error) before the leader runs the call. Not guarded: a process that dies
*inside* a device call leaves the others blocked in that call's collectives until the
coordination service's heartbeat timeout (jax.distributed.initialize heartbeat_timeout_seconds,
default 100 s) terminates them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
import zlib
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

OPS = ("hello", "mixed", "decode", "precompile", "swap", "stop")
PREFIX = "klong/serve"
# Leader's wait for every follower's ack of a call. Acks come before the followers run the call,
# so this bounds how far a follower may lag (e.g. compiling a new shape or restoring weights
# slower than the leader), not how long a call runs. Env override: KLONG_SERVE_LINK_TIMEOUT_S.
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 5.0  # Followers re-arm their wait for the next call this often while serving is idle.


class LinkError(RuntimeError):
  """A follower is gone, timed out or refused a call; or a follower lost the leader."""


# ---- messages ------------------------------------------------------------------------------


@dataclasses.dataclass
class Message:
  """One device call's host inputs: `op`, sequence number, scalars `meta`, numpy `arrays`."""

  op: str
  seq: int
  meta: dict[str, Any]
  arrays: dict[str, np.ndarray]


def encode(op: str, seq: int, meta: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> bytes:
  """A JSON header (op, seq, meta, each array's dtype / shape) then the arrays' bytes, zlib'd.

  Each array is sent up to its last nonzero entry along its last axis (page tables and token
  buckets are zero-padded: a decode call's [rows, pages_per_seq] table is mostly trash page 0
  until the contexts fill), integer arrays as differences along that axis (a request's pages
  are mostly runs of consecutive ids: differences of 1, which zlib folds). A v5p-16 decode
  call with every row at 32K tokens: 132 KB raw, ~2 KB sent; `decode` restores the arrays."""
  if op not in OPS:
    raise ValueError(f"unknown call {op!r}; calls are {OPS}")
  specs, blobs = [], []
  for name, a in (arrays or {}).items():
    a = np.asarray(a)
    if not a.ndim:
      specs.append([name, a.dtype.str, [], 0])
      blobs.append(a.tobytes())
      continue
    nz = np.flatnonzero(a.reshape(-1, a.shape[-1]).any(axis=0))
    kept = int(nz[-1]) + 1 if nz.size else 0
    part = a[..., :kept]
    if a.dtype.kind in "iu" and kept:
      part = np.diff(part, axis=-1, prepend=np.zeros_like(part[..., :1]))  # Wraps: lossless.
    specs.append([name, a.dtype.str, list(a.shape), kept])
    blobs.append(part.tobytes())  # C order.
  header = json.dumps({"op": op, "seq": int(seq), "meta": meta or {}, "arrays": specs}).encode()
  return struct.pack("<I", len(header)) + header + zlib.compress(b"".join(blobs), 1)


def decode(data: bytes) -> Message:
  """Inverse of `encode`."""
  (n,) = struct.unpack("<I", data[:4])
  head = json.loads(data[4:4 + n])
  data = zlib.decompress(data[4 + n:])
  arrays, off = {}, 0
  for name, dtype, shape, kept in head["arrays"]:
    dt = np.dtype(dtype)
    if not shape:
      arrays[name] = np.frombuffer(data, dt, 1, off).reshape(()).copy()
      off += dt.itemsize
      continue
    sent = (*shape[:-1], kept)
    count = int(np.prod(sent))
    full = np.zeros(shape, dt)
    part = np.frombuffer(data, dt, count, off).reshape(sent)
    full[..., :kept] = np.cumsum(part, axis=-1, dtype=dt) if dt.kind in "iu" else part
    arrays[name] = full
    off += count * dt.itemsize
  if off != len(data):
    raise LinkError(f"call {head['seq']} ({head['op']}): {len(data) - off} bytes left over after "
                    "its arrays: the processes run different klong-jax versions")
  return Message(head["op"], int(head["seq"]), head["meta"], arrays)


# ---- key-value store -----------------------------------------------------------------------


class Store(Protocol):
  """The coordination service's key-value store (`CoordinatorStore`; tests: an in-memory one)."""

  def set(self, key: str, value: bytes) -> None: ...

  def get(self, key: str, timeout_s: float) -> bytes | None:
    """The value, or None after `timeout_s` without one."""

  def delete(self, key: str) -> None: ...


class CoordinatorStore:
  """jax.distributed's key-value store (every process must have called initialize)."""

  def __init__(self):
    from jax._src import distributed  # noqa: PLC0415 (the client is not public API)

    self.client = distributed.global_state.client
    if self.client is None:
      raise LinkError("multi-host serving needs jax.distributed.initialize first "
                      "(parallel/mesh.maybe_initialize_distributed reads KLONG_COORDINATOR)")

  def set(self, key: str, value: bytes) -> None:
    self.client.key_value_set_bytes(key, value, allow_overwrite=True)

  def get(self, key: str, timeout_s: float) -> bytes | None:
    try:
      return self.client.blocking_key_value_get_bytes(key, max(1, int(timeout_s * 1000)))
    except Exception as e:  # noqa: BLE001 (JaxRuntimeError: DEADLINE_EXCEEDED or a dead service)
      if "DEADLINE_EXCEEDED" in str(e):
        return None
      raise LinkError(f"the coordination service (process 0) is unreachable: {e}") from e

  def delete(self, key: str) -> None:
    self.client.key_value_delete(key)


# ---- leader and followers ------------------------------------------------------------------


def _call_key(seq: int) -> str:
  return f"{PREFIX}/call/{seq}"


def _ack_key(seq: int, process: int) -> str:
  return f"{PREFIX}/ack/{seq}/{process}"


class Leader:
  """Process 0's end: `send` publishes a call and waits for every follower's ack."""

  def __init__(self, store: Store, num_processes: int, fingerprint: dict[str, Any],
               timeout_s: float = DEFAULT_TIMEOUT_S):
    self.store, self.followers = store, list(range(1, num_processes))
    self.timeout_s = timeout_s
    self.seq = 0
    self.error: LinkError | None = None  # Set on the first failure: the link is then dead.
    self.closed = False
    self.stats = {"calls": 0, "bytes": 0, "seconds": 0.0}
    self._send("hello", {"fingerprint": fingerprint}, {})

  def send(self, op: str, arrays: dict[str, np.ndarray] | None = None, **meta: Any) -> None:
    """Publishes call `op` and returns once every follower acked it (raises LinkError if one
    refused it or stayed silent for `timeout_s`; the link is then dead)."""
    if self.error is not None:
      raise self.error
    if self.closed:
      raise LinkError(f"call {op!r} after the multi-host link was closed (engine stopped)")
    self._send(op, meta, arrays or {})

  def _send(self, op: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    start = time.monotonic()
    data = encode(op, self.seq, meta, arrays)
    self.store.set(_call_key(self.seq), data)
    try:
      for p in self.followers:
        ack = self.store.get(_ack_key(self.seq, p), self.timeout_s)
        if ack is None:
          raise LinkError(
              f"follower process {p} did not take call {self.seq} ({op}) within "
              f"{self.timeout_s:g}s: it died, hangs, or lags (compiling, loading weights); "
              "check its log, then restart every process of the server")
        if ack != b"ok":
          raise LinkError(f"follower process {p} refused call {self.seq} ({op}): "
                          f"{ack.decode(errors='replace')}")
    except LinkError as e:
      self.error = e
      raise
    for p in self.followers:
      self.store.delete(_ack_key(self.seq, p))
    if self.seq:
      self.store.delete(_call_key(self.seq - 1))  # Every follower has moved past it.
    self.seq += 1
    self.stats["calls"] += 1
    self.stats["bytes"] += len(data)
    self.stats["seconds"] += time.monotonic() - start

  def close(self) -> None:
    """Tells the followers to stop (idempotent; skipped when the link is already dead)."""
    if not self.closed and self.error is None:
      self._send("stop", {}, {})
    self.closed = True


class Follower:
  """A follower's end: `recv` the next call, `ack` it (before running it)."""

  def __init__(self, store: Store, process: int, fingerprint: dict[str, Any],
               timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = POLL_S):
    self.store, self.process, self.poll_s = store, process, poll_s
    self.seq = 0
    msg = self._wait(timeout_s)
    if msg is None:
      raise LinkError(f"process {process}: no hello from process 0 within {timeout_s:g}s")
    theirs = msg.meta.get("fingerprint", {})
    diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if msg.op != "hello" or diff:
      what = ", ".join(f"{k}: process 0 {theirs.get(k)!r} vs here {fingerprint.get(k)!r}"
                       for k in diff) or f"first call {msg.op!r}"
      self.refuse(f"process {process} serves another engine ({what}); start every process "
                  "with the same config")
    self.ack()

  def _wait(self, timeout_s: float | None) -> Message | None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      left = self.poll_s if deadline is None else min(self.poll_s, deadline - time.monotonic())
      if left <= 0:
        return None
      data = self.store.get(_call_key(self.seq), left)
      if data is not None:
        msg = decode(data)
        if msg.seq != self.seq:
          self.refuse(f"expected call {self.seq}, got call {msg.seq}")
        return msg

  def recv(self) -> Message:
    """The next call (waits as long as the server is idle)."""
    msg = self._wait(None)
    assert msg is not None
    return msg

  def ack(self) -> None:
    self.store.set(_ack_key(self.seq, self.process), b"ok")
    self.seq += 1

  def refuse(self, reason: str) -> None:
    """Tells the leader why this call cannot run here, then raises LinkError here too."""
    self.store.set(_ack_key(self.seq, self.process), reason.encode())
    raise LinkError(reason)


# ---- the paged engine over the link --------------------------------------------------------


def fingerprint(engine: Any) -> dict[str, Any]:
  """What every process's engine must agree on for the calls to be identical."""
  s = engine.sampler
  shapes = sorted((str(k), tuple(np.shape(v)), str(getattr(v, "dtype", "")))
                  for k, v in _leaves(s.params))
  return {"engine": type(engine).__name__, "max_batch": s.max_batch, "max_len": s.max_len,
          "page_size": engine.page_size, "num_pages": engine.alloc.num_pages,
          "token_budget": engine.token_budget, "decode_steps": engine.decode_steps,
          "min_bucket": engine.min_bucket, "attention": engine.attention_impl,
          "cache_dtype": str(np.dtype(s.cache_dtype)), "policy_version": s.policy_version,
          "mesh": dict(s.mesh.shape) if s.mesh is not None else None,
          "model": hashlib.sha256(repr(s.model_cfg).encode()).hexdigest()[:16],
          "params": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}


def _leaves(tree: Any) -> list[tuple[Any, Any]]:
  import jax  # noqa: PLC0415
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def link_timeout_s() -> float:
  return float(os.environ.get("KLONG_SERVE_LINK_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def connect(engine: Any, store: Store | None = None, timeout_s: float | None = None
            ) -> Follower | None:
  """Joins this process's engine to the others (every process calls it after building the same
  engine): on process 0 the engine gets a `Leader` (`engine.link`) and None is returned; on
  the others the returned `Follower` is for `follow`. One process: nothing to do, None."""
  import jax  # noqa: PLC0415

  from klong_jax.inference.paged.engine import PagedEngine  # noqa: PLC0415

  n = jax.process_count()
  if n == 1:
    return None
  if not isinstance(engine, PagedEngine):
    raise ValueError("multi-host serving runs the paged engine; set serve.engine='paged'")
  store = store or CoordinatorStore()
  timeout_s = link_timeout_s() if timeout_s is None else timeout_s
  if jax.process_index() == 0:
    engine.attach(Leader(store, n, fingerprint(engine), timeout_s))
    return None
  return Follower(store, jax.process_index(), fingerprint(engine), timeout_s)


def join(engine: Any) -> bool:
  """`connect`s this process; a follower then `follow`s until process 0 stops and shuts
  jax.distributed down: True when this process served as a follower (nothing left to do)."""
  import jax  # noqa: PLC0415

  follower = connect(engine)
  if follower is None:
    return False
  log.info("process %d of %d: following process 0's device calls", jax.process_index(),
           jax.process_count())
  try:
    follow(engine, follower)
  finally:
    jax.distributed.shutdown()
  return True


def agreed_version(version: int | None) -> int | None:
  """Process 0's `version` on every process (one process: `version`). At start-up, so that a
  policy published while the hosts list the directory loads on all of them or none."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if jax.process_count() == 1:
    return version
  agreed = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if version is None else version)))
  return None if agreed < 0 else agreed


_ARRAYS = {"mixed": {"tokens", "positions", "seq", "valid", "page_indices", "kv_lens",
                     "cu_q_lens", "num_seqs", "sample_at", "temp", "top_k", "top_p", "seeds",
                     "counters"},
           "decode": {"tokens", "positions", "counters", "remaining", "stop_ids", "page_indices",
                      "temp", "top_k", "top_p", "seeds"}}


def _check(engine: Any, msg: Message) -> str | None:
  """Why this follower cannot run `msg` as process 0 does (None: it can)."""
  if msg.op not in OPS:
    return f"unknown call {msg.op!r}"
  want = _ARRAYS.get(msg.op, set())
  if set(msg.arrays) != want:
    return f"call {msg.op} carries arrays {sorted(msg.arrays)}, expected {sorted(want)}"
  version = msg.meta.get("version")
  if version is not None and version != engine.sampler.policy_version:
    return (f"call {msg.seq} ({msg.op}) is for weights version {version} but this process "
            f"serves version {engine.sampler.policy_version}")
  pages = msg.arrays.get("page_indices")
  if pages is not None and pages.shape[-1] != engine.pages_per_seq:
    return f"page tables of width {pages.shape[-1]}, this engine's is {engine.pages_per_seq}"
  return None


def follow(engine: Any, follower: Follower) -> int:
  """A follower's serving loop: runs each call process 0 announces until `stop`; returns the
  number of calls run. Raises LinkError on a call it cannot run (after telling process 0)."""
  from klong_jax.inference import reload  # noqa: PLC0415

  calls = 0
  while True:
    msg = follower.recv()
    reason = _check(engine, msg)
    if reason:
      follower.refuse(f"process {follower.process}: {reason}")
    follower.ack()
    if msg.op == "stop":
      log.info("process %d: stop after %d calls", follower.process, calls)
      return calls
    if msg.op == "mixed":
      engine.run_mixed(msg.arrays)
    elif msg.op == "decode":
      engine.run_decode(msg.arrays)
    elif msg.op == "precompile":
      engine.precompile()
    elif msg.op == "swap":
      m = msg.meta
      try:
        reload.PolicySwap(engine.sampler, m["path"], int(m["to"]), m.get("root") or None)()
      except Exception:  # noqa: BLE001 (as process 0's engine loop: log, keep serving)
        # A bad version fails on every process alike; swap_in_place then put the old one back.
        # Should the processes end up on different versions, the next call says so.
        log.exception("process %d: loading policy %s failed", follower.process, m["path"])
      engine.on_new_version(engine.sampler.policy_version)
    calls += 1
