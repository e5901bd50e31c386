"""Run state on Google Cloud Storage (`gs://bucket/path`) with GCS preconditions; no JAX imports.

The stream, policy versions and checkpoints live in one bucket on a pod. GCS has no rename and no
hard link, but every object write is atomic (an object appears only once complete) and takes a
generation precondition, which is all exactly-once needs:
  create(path, data)            ifGenerationMatch=0: create-if-absent (one of N racers wins)
  replace(path, data, gen)      ifGenerationMatch=gen: compare-and-swap (stale-claim takeover)
  upload(local, path)           ifGenerationMatch=0: publish an immutable shard at most once
Clients come from google-cloud-storage (imported lazily, so local runs never need it), one per
process and thread; it honours $STORAGE_EMULATOR_HOST (an emulator such as fake-gcs-server).
Orbax's array writes go through tensorstore, which instead reads $TENSORSTORE_GCS_HTTP_URL:
`use_emulator(url)` sets both.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import threading
import uuid
from typing import Any

SCHEME = "gs://"
_local = threading.local()


def is_gcs(path: str | os.PathLike) -> bool:
  """Whether `path` names a GCS object or prefix (`gs://bucket/...`)."""
  return os.fspath(path).startswith(SCHEME)


def split(path: str | os.PathLike) -> tuple[str, str]:
  """'gs://b/x/y' -> ('b', 'x/y'); the bucket must be named."""
  rest = os.fspath(path)[len(SCHEME):]
  bucket, _, name = rest.partition("/")
  if not bucket:
    raise ValueError(f"{path!r} names no bucket; use gs://BUCKET/path")
  return bucket, name


def join(root: str | os.PathLike, *parts: str) -> str:
  """Joins path parts with '/' for gs:// (os.path.join otherwise)."""
  root = os.fspath(root)
  return posixpath.join(root, *parts) if is_gcs(root) else os.path.join(root, *parts)


def use_emulator(url: str) -> None:
  """Points google-cloud-storage, gcsfs (etils.epath) and tensorstore (Orbax) at an emulator."""
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
  # gcsfs's default filesystem asks the storage control plane for each bucket's layout (an API
  # emulators lack); its plain JSON-API filesystem is used instead (read when gcsfs is imported).
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  _local.__dict__.clear()


def client() -> Any:
  """This process's and thread's `google.cloud.storage.Client` (clients are not fork-safe)."""
  key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
  if getattr(_local, "key", None) != key:
    from google.cloud import storage as gcs  # noqa: PLC0415  (only gs:// users need it)
    _local.client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
    _local.key = key
  return _local.client


def _blob(path: str) -> Any:
  bucket, name = split(path)
  if not name:
    raise ValueError(f"{path!r} names a bucket, not an object")
  return client().bucket(bucket).blob(name)


def _errors() -> Any:
  from google.api_core import exceptions  # noqa: PLC0415
  return exceptions


def read(path: str) -> tuple[bytes, int] | None:
  """(data, generation) of an object, or None when it does not exist."""
  b = _blob(path)
  try:
    data = b.download_as_bytes()
  except _errors().NotFound:
    return None
  return data, int(b.generation)


def create(path: str, data: bytes) -> int | None:
  """Creates the object only if absent; returns its generation, or None if it already existed.

  A retried request whose first attempt succeeded also reports None: callers that must know put
  a nonce in `data` and re-read.
  """
  b = _blob(path)
  try:
    b.upload_from_string(data, if_generation_match=0)
  except _errors().PreconditionFailed:
    return None
  return int(b.generation)


def replace(path: str, data: bytes, generation: int) -> int | None:
  """Overwrites the object only if it is still at `generation`; returns the new one, or None."""
  b = _blob(path)
  try:
    b.upload_from_string(data, if_generation_match=int(generation))
  except (_errors().PreconditionFailed, _errors().NotFound):
    return None
  return int(b.generation)


def write(path: str, data: bytes) -> None:
  """Writes (or overwrites) an object; readers see the old or the new bytes, never a mix."""
  _blob(path).upload_from_string(data)


def exists(path: str) -> bool:
  return bool(_blob(path).exists())


def delete(path: str) -> bool:
  """Deletes an object; returns False if it did not exist."""
  try:
    _blob(path).delete()
  except _errors().NotFound:
    return False
  return True


def upload(local: str | os.PathLike, path: str) -> bool:
  """Uploads a local file as a new object; False if the object already exists (not replaced).

  The object becomes visible only when the whole upload (single or resumable) has completed, so
  a writer killed mid-upload leaves nothing behind.
  """
  try:
    _blob(path).upload_from_filename(os.fspath(local), if_generation_match=0)
  except _errors().PreconditionFailed:
    return False
  return True


def download(path: str, local: str | os.PathLike) -> None:
  """Downloads an object to `local` (temp name + rename: a reader never sees half a file)."""
  local = os.fspath(local)
  os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
  tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
  try:
    try:
      _blob(path).download_to_filename(tmp)
    except _errors().NotFound:
      raise FileNotFoundError(f"{path} does not exist") from None
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
  """One listed object: its gs:// path, size, generation and creation time (ns since epoch)."""

  path: str
  size: int
  generation: int
  created_ns: int


def list_objects(prefix: str) -> list[ObjectInfo]:
  """Every object whose path starts with `prefix` (a 'directory' ends with '/'), by path."""
  bucket, name = split(prefix)
  out = []
  for b in client().list_blobs(bucket, prefix=name):
    created = b.time_created
    ns = round(created.timestamp() * 1e6) * 1000 if created else 0
    out.append(ObjectInfo(f"{SCHEME}{bucket}/{b.name}", int(b.size or 0), int(b.generation),
                          ns))
  return sorted(out, key=lambda o: o.path)


def list_dirs(prefix: str) -> list[str]:
  """Names of the immediate 'sub-directories' of `prefix` (one delimiter listing)."""
  bucket, name = split(prefix)
  name = name.rstrip("/") + "/" if name else ""
  it = client().list_blobs(bucket, prefix=name, delimiter="/")
  for _ in it:  # The prefixes are filled in while the pages are read.
    pass
  return sorted(p[len(name):].rstrip("/") for p in it.prefixes)


def delete_prefix(prefix: str) -> int:
  """Deletes every object under `prefix`; returns how many."""
  n = 0
  for o in list_objects(prefix):
    n += delete(o.path)
  return n
