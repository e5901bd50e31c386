"""Writing a benchmark's result JSON (atomic: temp file + rename, so run_all never reads half)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json(path: str | os.PathLike, result: Any, indent: int = 1) -> str:
  """Writes `result` to `path` atomically (parent dirs created); returns the absolute path."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False,
                                   suffix=".tmp") as f:
    json.dump(result, f, indent=indent)
  os.replace(f.name, path)
  print(f"wrote {path}")
  return path
