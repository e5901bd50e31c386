"""Writing a benchmark's result JSON (atomic: temp file + rename, so run_all never reads half)."""

from __future__ import annotations

import os
from typing import Any

from klong_jax import fileio


def write_json(path: str | os.PathLike, result: Any, indent: int = 1) -> str:
  """Writes `result` to `path` atomically (parent dirs created); returns the absolute path."""
  path = os.path.abspath(path)
  fileio.atomic_write_json(path, result, indent)
  print(f"wrote {path}")
  return path
