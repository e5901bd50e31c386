"""ArrayRecord shard IO with atomic publish: write to a temp name, rename on close.

Readers only ever see complete shards (`list_shards` ignores temp names). No JAX imports.
A `gs://` shard is written to a local staging file and uploaded on close (an object is visible
only once complete; an existing shard is never replaced); gs:// shards are read from a local copy.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import posixpath
import tempfile
import uuid
from collections.abc import Iterator

from array_record.python import array_record_module as ar

from klong_jax.data import schema, storage

SUFFIX = ".array_record"
_TMP_MARK = ".tmp-"


class ShardError(OSError):
  """An unreadable shard; the message names the file."""


class ShardWriter:
  """Writes records to `<path>` via a hidden temp file renamed into place on `close()`.

  Use as a context manager; an exception inside the `with` discards the temp file, so a crashed
  writer never publishes a partial shard.
  """

  def __init__(self, path: str | os.PathLike, options: str = "group_size:1"):
    self.remote = os.fspath(path) if storage.is_gcs(path) else None
    if self.remote is not None:  # Staged locally; close() uploads it if the shard is absent.
      self.path = pathlib.Path(staging_dir()) / posixpath.basename(self.remote)
    else:
      self.path = pathlib.Path(path)
    if self.path.suffix != SUFFIX:
      raise ValueError(f"shard path {self.remote or self.path} must end with {SUFFIX}")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.path.with_name(f".{self.path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    self._writer = ar.ArrayRecordWriter(str(self._tmp), options)
    self.num_records = 0
    self.uploaded: bool | None = None  # gs://: False when the shard already existed.

  def write(self, record: bytes) -> None:
    if self._writer is None:
      raise ValueError(f"shard writer for {self.path} is closed")
    self._writer.write(record)
    self.num_records += 1

  def close(self) -> None:
    """Finishes the file and publishes it atomically (rename)."""
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    if self.remote is None:
      os.replace(self._tmp, self.path)
      return
    try:
      self.uploaded = storage.upload(self._tmp, self.remote)
    finally:
      self._tmp.unlink(missing_ok=True)

  def abort(self) -> None:
    """Drops the temp file without publishing."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_shard(path: str | os.PathLike, records: list[bytes]) -> pathlib.Path | str:
  """Writes all records to one atomically published shard (a gs:// path is returned as a str)."""
  with ShardWriter(path) as w:
    for r in records:
      w.write(r)
  return os.fspath(path) if storage.is_gcs(path) else pathlib.Path(path)


def staging_dir() -> str:
  """Local dir for gs:// shards being written ($KLONG_SHARD_STAGING, else under $TMPDIR)."""
  return os.environ.get("KLONG_SHARD_STAGING") or os.path.join(tempfile.gettempdir(),
                                                               "klong-shard-staging")


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A local path holding the shard: the path itself, or a temp download of a gs:// shard."""
  if not storage.is_gcs(path):
    yield pathlib.Path(path)
    return
  with tempfile.TemporaryDirectory(prefix="klong-shard-") as d:
    local = pathlib.Path(d) / posixpath.basename(os.fspath(path))
    try:
      storage.download(os.fspath(path), local)
    except FileNotFoundError:
      raise ShardError(f"shard {path} does not exist") from None
    yield local


def _open_reader(path: pathlib.Path):
  if not path.is_file():
    raise ShardError(f"shard {path} does not exist")
  try:
    reader = ar.ArrayRecordReader(str(path))
    if not reader.ok():  # the C++ reader reports a bad footer lazily: surface it now
      reader.close()
    return reader, int(reader.num_records())
  except Exception as e:  # the C++ reader raises RuntimeError/ValueError with bare messages
    raise ShardError(f"shard {path} is corrupt or not an ArrayRecord file ({e}); delete or "
                     "re-write it") from None


def num_records(path: str | os.PathLike) -> int:
  """Number of records in a shard (clear error naming the file if it is corrupt)."""
  with local_copy(path) as p:
    try:
      reader, n = _open_reader(p)
    except ShardError as e:
      raise ShardError(str(e).replace(str(p), os.fspath(path))) from None
    reader.close()
  return n


def read_shard(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields the records of one shard; a corrupt file raises `ShardError` naming it."""
  if storage.is_gcs(path):
    with local_copy(path) as p:
      try:
        yield from read_shard(p)
      except ShardError as e:  # Name the object, not the temp copy.
        raise ShardError(str(e).replace(str(p), os.fspath(path))) from None
    return
  p = pathlib.Path(path)
  reader, n = _open_reader(p)
  try:
    step = 256
    for start in range(0, n, step):
      try:
        batch = reader.read(list(range(start, min(n, start + step))))
      except Exception as e:
        raise ShardError(f"shard {p} is corrupt at records [{start}, {min(n, start + step)}) "
                         f"({e}); delete or re-write it") from None
      yield from batch
  finally:
    reader.close()


def list_shards(directory: str | os.PathLike, pattern: str = "**/*" + SUFFIX) -> list[str]:
  """Published shards under `directory`, sorted (temp files from unfinished writers excluded)."""
  if storage.is_gcs(directory):
    prefix = os.fspath(directory).rstrip("/") + "/"
    return [o.path for o in storage.list_objects(prefix)
            if _glob_match(o.path[len(prefix):], pattern) and is_published_name(o.path)]
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"shard directory {d} does not exist")
  return sorted(str(p) for p in d.glob(pattern)
                if p.is_file() and _TMP_MARK not in p.name and not p.name.startswith("."))


def is_published_name(path: str) -> bool:
  """Whether a file or object name is a published shard (not a writer's hidden temp)."""
  name = posixpath.basename(path)
  return name.endswith(SUFFIX) and _TMP_MARK not in name and not name.startswith(".")


def _glob_match(rel: str, pattern: str) -> bool:
  """pathlib-glob semantics on a relative object name ('**/' matches any depth, even none)."""
  if pattern.startswith("**/"):  # PurePath.match is anchored on the right: any depth.
    return pathlib.PurePosixPath(rel).match(pattern[3:])
  p = pathlib.PurePosixPath(rel)
  return len(p.parts) == len(pathlib.PurePosixPath(pattern).parts) and p.match(pattern)


def validate_shard(path: str | os.PathLike) -> int:
  """Reads every record of a shard once; returns the count or raises `ShardError` naming it."""
  return sum(1 for _ in read_shard(path))


def iter_trajectories(directory: str) -> Iterator[schema.Trajectory]:
  """Every Trajectory in the shards under `directory` (temp files excluded by list_shards)."""
  for path in list_shards(directory):
    for raw in read_shard(path):
      yield schema.from_bytes(raw)
