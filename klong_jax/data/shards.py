"""ArrayRecord shard IO with atomic publish: write to a temp name, rename on close.

Readers only ever see complete shards (`list_shards` ignores temp names). No JAX imports.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Iterator

from array_record.python import array_record_module as ar

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
    self.path = pathlib.Path(path)
    if self.path.suffix != SUFFIX:
      raise ValueError(f"shard path {self.path} must end with {SUFFIX}")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.path.with_name(f".{self.path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    self._writer = ar.ArrayRecordWriter(str(self._tmp), options)
    self.num_records = 0

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
    os.replace(self._tmp, self.path)

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


def write_shard(path: str | os.PathLike, records: list[bytes]) -> pathlib.Path:
  """Writes all records to one atomically published shard."""
  with ShardWriter(path) as w:
    for r in records:
      w.write(r)
  return pathlib.Path(path)


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
  p = pathlib.Path(path)
  reader, n = _open_reader(p)
  reader.close()
  return n


def read_shard(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields the records of one shard; a corrupt file raises `ShardError` naming it."""
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
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f"shard directory {d} does not exist")
  return sorted(str(p) for p in d.glob(pattern)
                if p.is_file() and _TMP_MARK not in p.name and not p.name.startswith("."))


def validate_shard(path: str | os.PathLike) -> int:
  """Reads every record of a shard once; returns the count or raises `ShardError` naming it."""
  return sum(1 for _ in read_shard(path))
