"""Serving policy checkpoints: params-only Orbax saves at `<run>/policy/<version>`, hot reload.

Format: `<root>/<version>/params` is an Orbax StandardCheckpointer directory holding the model's
variables (nnx Params and the MoE router's ExpertBias; everything but RNG state) as a pure nested
dict (`nnx.state(model, nnx.Not(nnx.RngState)).to_pure_dict()`); a Params-only tree also loads
(the other variables then keep their served values). It is written to
a hidden temp dir and renamed into place, so a directory named by an integer is always complete.
On `gs://` (no directory rename) a version is written in place and then committed by the object
`<root>/<version>/_COMMITTED`; readers (`list_versions`, `latest_version`, `load_policy`) only
see committed versions, and a re-save of an uncommitted version first clears its leftovers.
`PolicyWatcher` polls the root and hands the newest version to the engine, which swaps it in
between decode steps (no restart, no dropped requests): `swap_in_place` drops the served weights
before restoring the new ones, so a server never holds two full copies.
`AsyncPublisher` is the trainer's side: it starts each version's Orbax save (the arrays leave the
devices) and commits it from a background thread (training continues), one version in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from klong_jax.data import storage
from klong_jax.inference import weight_layout
from klong_jax.model import precision

log = logging.getLogger(__name__)
_VERSION_RE = re.compile(r"^\d+$")
COMMITTED = "_COMMITTED"  # gs:// only: written last, after Orbax finished the version.


def policy_root(run_dir: str | os.PathLike) -> pathlib.Path | epath.Path:
  """`<run>/policy` (the directory the trainer publishes to; an epath for gs://)."""
  if storage.is_gcs(run_dir):
    return epath.Path(run_dir) / "policy"
  return pathlib.Path(run_dir) / "policy"


def params_dict(params: Any) -> dict:
  """A pure nested dict of arrays from an nnx module (all non-RNG variables), State, or dict."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Not(nnx.RngState))
  if isinstance(params, nnx.State):
    params = params.to_pure_dict()
  return params


def save_policy(root: str | os.PathLike, version: int, params: Any,
                dtype: Any = None) -> pathlib.Path | epath.Path:
  """Writes params (module, State or pure dict) as `<root>/<version>` atomically; returns the path.

  `dtype` (e.g. jnp.bfloat16) casts the matmul weights before saving (the compute-dtype policy:
  router, expert bias, norms and biases stay fp32, as the trainer computes them).
  """
  return begin_save(root, version, params, dtype).finish()


class PendingSave:
  """A policy version whose Orbax save has started: `finish()` waits for the write, then commits
  it (local: renames the temp dir into place; gs://: writes `_COMMITTED`), returning the path."""

  def __init__(self, ckptr: Any, commit: Callable[[], Any]):
    self._ckptr, self._commit = ckptr, commit

  def finish(self) -> pathlib.Path | epath.Path:
    try:
      self._ckptr.wait_until_finished()
    finally:
      self._ckptr.close()
    return self._commit()


def begin_save(root: str | os.PathLike, version: int, params: Any,
               dtype: Any = None) -> PendingSave:
  """Starts writing `<root>/<version>` and returns once the arrays are copied off the devices
  (Orbax's blocking part: the caller may then donate or change them); the upload continues in
  Orbax's background thread and becomes visible only at `PendingSave.finish()`.

  Saves are started on the caller's thread only: Orbax numbers its save operations process-wide,
  so saves started concurrently from two threads (e.g. beside the trainer's checkpoint) collide.
  """
  if int(version) < 0:
    raise ValueError(f"policy version must be >= 0, got {version}")
  tree = _cast(params_dict(params), dtype)
  ckptr = ocp.StandardCheckpointer()
  if storage.is_gcs(root):
    root = os.fspath(root).rstrip("/")
    final = storage.join(root, str(int(version)))
    if storage.exists(storage.join(final, COMMITTED)):
      raise FileExistsError(f"policy version {version} already exists at {final}; versions are "
                            "immutable, publish a new version number")
    primary = jax.process_index() == 0  # Multi-host: Orbax syncs the hosts around its writes.
    stale = storage.delete_prefix(final + "/") if primary else 0  # An unfinished save: unseen.
    if stale:
      log.warning("removed %d objects of an unfinished save of policy version %d", stale, version)
    ckptr.save(epath.Path(final) / "params", tree)

    def commit() -> epath.Path:
      if primary:
        storage.write(storage.join(final, COMMITTED), f'{{"version": {int(version)}}}'.encode())
      return epath.Path(final)

    return PendingSave(ckptr, commit)
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  final = root / str(int(version))
  if final.exists():
    raise FileExistsError(f"policy version {version} already exists at {final}; versions are "
                          "immutable, publish a new version number")
  tmp = root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
  ckptr.save(tmp.absolute() / "params", tree)

  def rename() -> pathlib.Path:
    os.replace(tmp, final)
    return final

  return PendingSave(ckptr, rename)


def _cast(tree: Any, dtype: Any) -> Any:
  """`tree` under the shared compute-dtype policy for `dtype` (model/precision.py: matmul
  weights in `dtype`, router / expert bias / norms / biases fp32); None: unchanged."""
  if dtype is None:
    return tree
  return precision.cast_params(tree, dtype)


def _committed(root: str, version: str) -> bool:
  return storage.exists(storage.join(root, version, COMMITTED))


def list_versions(root: str | os.PathLike) -> list[int]:
  """Complete published versions under `root`, ascending (temp dirs are ignored)."""
  if storage.is_gcs(root):
    root = os.fspath(root).rstrip("/")
    return sorted(int(d) for d in storage.list_dirs(root)
                  if _VERSION_RE.match(d) and _committed(root, d))
  root = pathlib.Path(root)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def latest_version(root: str | os.PathLike) -> int | None:
  """The newest complete version under `root`, or None."""
  if storage.is_gcs(root):  # Newest first: usually one commit check, not one per version.
    root = os.fspath(root).rstrip("/")
    found = sorted((int(d) for d in storage.list_dirs(root) if _VERSION_RE.match(d)),
                   reverse=True)
    return next((v for v in found if _committed(root, str(v))), None)
  versions = list_versions(root)
  return versions[-1] if versions else None


def load_policy(path: str | os.PathLike, like: Any) -> dict:
  """Restores a policy dir as a pure dict shaped, typed and sharded like `like` (module/State/dict).

  Saved dtypes are cast to the target's (a bf16 bundle loads into an fp32 model and back).
  """
  remote = storage.is_gcs(path)
  path = epath.Path(os.fspath(path).rstrip("/")) if remote else pathlib.Path(path)
  if remote and not storage.exists(storage.join(os.fspath(path), COMMITTED)):
    raise FileNotFoundError(f"{path} is not a committed policy version (no {COMMITTED}); expected "
                            "a version written by reload.save_policy, whose save finished")
  if not (path / "params").is_dir():
    raise FileNotFoundError(f"{path} is not a policy checkpoint (no params/ inside); expected "
                            "a directory written by reload.save_policy")
  if isinstance(like, nnx.Module):
    like = nnx.state(like, nnx.Not(nnx.RngState))
  targets = [params_dict(like)]
  if isinstance(like, nnx.State):  # A Params-only checkpoint (e.g. from a trainer) also loads.
    targets.append(like.filter(nnx.Param).to_pure_dict())
  with ocp.StandardCheckpointer() as ckptr:
    for i, target in enumerate(targets):
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
          target)
      try:
        return ckptr.restore((path if remote else path.absolute()) / "params", abstract)
      except (ValueError, KeyError):
        if i == len(targets) - 1:
          raise
  raise AssertionError("unreachable")


def remove_version(root: str | os.PathLike, version: int) -> None:
  """Deletes a published version (e.g. retention); readers never see a partial directory."""
  if storage.is_gcs(root):  # Uncommit first: readers stop listing it before objects go.
    final = storage.join(os.fspath(root).rstrip("/"), str(int(version)))
    storage.delete(storage.join(final, COMMITTED))
    storage.delete_prefix(final + "/")
    return
  path = pathlib.Path(root) / str(int(version))
  tmp = path.with_name(f".del-{version}-{uuid.uuid4().hex[:8]}")
  os.replace(path, tmp)
  shutil.rmtree(tmp)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def swap_in_place(sampler: Any, path: str | os.PathLike, version: int,
                  root: str | os.PathLike | None = None) -> None:
  """Replaces `sampler.params` by the policy at `path`, never holding two full copies.

  Runs on the engine's thread between two steps. The served weights (every nnx Param; the small
  non-Param variables such as the router's expert bias stay until replaced, so a Params-only
  checkpoint still loads) are dropped first, so their buffers are freed before Orbax restores the
  new ones into the same shapes, dtypes and shardings. Then `sampler.policy_version = version`.
  If the restore fails, the previously served version is restored from `root` (when still
  published) and the error is re-raised, so the engine fails the running batch, not silently.
  """
  params = sampler.params
  old_version = int(sampler.policy_version)
  if isinstance(params, nnx.State):
    free = lambda x: x.replace(_abstract(x.get_value())) if isinstance(x, nnx.Param) else x  # noqa: E731
    like = jax.tree.map(free, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    like = jax.tree.map(_abstract, params)
  sampler.params = like  # The last reference to the old weights: their buffers go now.
  del params
  try:
    restored = load_policy(path, like)
  except Exception:
    if root is not None and old_version in list_versions(root) and old_version != int(version):
      log.exception("loading policy %s failed; restoring version %d", path, old_version)
      swap_in_place(sampler, storage.join(os.fspath(root), str(old_version)), old_version)
    raise
  if isinstance(like, nnx.State):
    new = jax.tree.map(lambda x: x, like)
    new.replace_by_pure_dict(restored)
    restored = new
  # The Sampler's weight layout (inference/weight_layout.py; a no-op off TPU). On TPU a relayout
  # holds one extra copy of that leaf while it runs (the old weights are gone by now).
  sampler.params = weight_layout.place_tree(restored)
  sampler.policy_version = int(version)


@dataclasses.dataclass(frozen=True)
class PolicySwap:
  """A scheduled `swap_in_place` of `sampler` to the policy at `path` (call it to run it).

  A value rather than a closure so that a multi-host server can send `path` and `version` to
  its other processes, which then swap at the same step (inference/multihost.py)."""

  sampler: Any
  path: str | os.PathLike
  version: int
  root: str | os.PathLike | None = None

  def __call__(self) -> None:
    swap_in_place(self.sampler, self.path, self.version, self.root)


class PublishError(RuntimeError):
  """A background publish failed; raised by the next `publish`, `wait` or `close`."""


class AsyncPublisher:
  """Publishes policy versions while the trainer keeps stepping.

  `publish` waits for the previous version (at most one in flight), starts its Orbax save on the
  caller's thread (`begin_save`: returns once the arrays, cast by the dtype policy, are off the
  devices, so the next train step may donate them) and returns; a thread then waits for the
  upload and commits it (`finish`: the rename / `_COMMITTED` object comes last, so readers never
  see a partial version). A failed upload raises PublishError at the next publish / wait / close.
  `finish` (tests: a slow storage) is called on that thread with the PendingSave.
  """

  def __init__(self, root: str | os.PathLike, dtype: Any = None,
               finish: Callable[[PendingSave], Any] | None = None):
    self.root, self.dtype = root, dtype
    self._finish = finish or PendingSave.finish
    self._thread: threading.Thread | None = None
    self._error: tuple[int, BaseException] | None = None
    self.in_flight: int | None = None  # The version uploading now.
    self.done: list[int] = []  # Versions committed.

  def publish(self, version: int, params: Any) -> None:
    """Starts uploading `params` (module, State or pure dict) as `version`; returns once the
    arrays are off the devices."""
    self.wait()
    pending = begin_save(self.root, int(version), params, self.dtype)
    self.in_flight = int(version)
    self._thread = threading.Thread(target=self._run, args=(int(version), pending),
                                    name=f"klong-publish-{version}")
    self._thread.start()

  def _run(self, version: int, pending: PendingSave) -> None:
    try:
      self._finish(pending)
      self.done.append(version)
    except BaseException as e:  # noqa: BLE001 (surfaced on the caller's thread)
      self._error = (version, e)

  def wait(self) -> None:
    """Blocks until the upload in flight (if any) is committed; raises its error."""
    if self._thread is not None:
      self._thread.join()
      self._thread, self.in_flight = None, None
    if self._error is not None:
      (version, e), self._error = self._error, None
      raise PublishError(f"publishing policy version {version} to {self.root} failed: "
                         f"{type(e).__name__}: {e}") from e

  def close(self) -> None:
    """Waits for the last upload (call at exit: a version the fleet waits for must land)."""
    self.wait()


class PolicyWatcher:
  """Polls `root` and swaps the newest version into an engine (`engine.set_params`)."""

  def __init__(self, engine: Any, root: str | os.PathLike, interval_s: float = 2.0,
               in_place: bool = True):
    self.engine, self.root, self.interval_s = engine, epath.Path(root), interval_s
    self.in_place = in_place
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()
    self.loaded = -1

  def check(self) -> int | None:
    """Loads the newest version if it is newer than the one served; returns it (or None)."""
    with self._lock:
      newest = latest_version(self.root)
      if newest is None or newest <= max(self.engine.policy_version, self.loaded):
        return None
      return self.load(newest)

  def load(self, version: int) -> int:
    """Schedules `version` on the engine.

    in_place (default): the engine runs `swap_in_place` between two steps (the old weights are
    dropped before the new ones are read: ~1x weight memory, serving pauses for the load).
    Otherwise the new weights are restored here, next to the served ones (2x), and handed over.
    """
    path = self.root / str(version)
    if self.in_place:
      self.engine.set_params(PolicySwap(self.engine.sampler, path, version, self.root), version)
    else:
      self.engine.set_params(load_policy(path, self.engine.sampler.params), version)
    self.loaded = version
    log.info("loaded policy version %d from %s", version, self.root)
    return version

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="klong-policy-watcher", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _loop(self) -> None:
    while not self._stop.wait(self.interval_s):
      try:
        self.check()
      except Exception:  # A bad checkpoint must not kill serving; log and retry later.
        log.exception("policy reload from %s failed", self.root)
