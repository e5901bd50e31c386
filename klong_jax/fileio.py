"""Atomic local writes (temp file in the same dir + rename): readers never see a partial file.

Stdlib only, so the CPU fleet, the trainer and the tools share it. gs:// paths go through
`klong_jax.data.storage` (one object write is already atomic there).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` (parent dirs created); on any error the old file stays as it was."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
  """`obj` as JSON (non-JSON values through str(), trailing newline), written atomically."""
  atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")
